"""Pure tensor math for matrix product operators: shapes, decomposition, contraction, costs and
initial values. Nothing here is an nn.Module, reads a file or prints; it imports only torch and
`mpocompress.errors`."""

from mpocompress.tensors.contract import merge_cores, mpo_contract, mpo_to_matrix
from mpocompress.tensors.cost import (
    ContractionPlan,
    CostModel,
    candidate_plans,
    choose_plan,
    contract_macs,
    grouped_macs,
    plan_cost,
    rebuild_macs,
)
from mpocompress.tensors.decompose import (
    TT_METHODS,
    TTDecomposition,
    bond_spectra,
    entanglement_entropy,
    tt_round,
    tt_svd,
    unfolding_spectra,
)
from mpocompress.tensors.initialize import balance_cores, random_cores
from mpocompress.tensors.numeric import all_finite, frobenius_norm
from mpocompress.tensors.shape import (
    Modes,
    MPOShape,
    bond_caps,
    bond_dims_for,
    check_modes,
    compression_ratio,
    factorize,
    format_modes,
    parse_modes,
    parse_shape_spec,
    resolve_bonds,
    resolve_modes,
)

__all__ = [
    "TT_METHODS", "ContractionPlan", "CostModel", "MPOShape", "Modes", "TTDecomposition", "all_finite",
    "balance_cores", "bond_caps", "bond_dims_for", "bond_spectra", "candidate_plans", "check_modes", "choose_plan",
    "compression_ratio", "contract_macs", "entanglement_entropy", "factorize", "format_modes", "frobenius_norm",
    "grouped_macs", "merge_cores", "mpo_contract", "mpo_to_matrix", "parse_modes", "parse_shape_spec", "plan_cost",
    "random_cores", "rebuild_macs", "resolve_bonds", "resolve_modes", "tt_round", "tt_svd", "unfolding_spectra",
]  # fmt: skip
