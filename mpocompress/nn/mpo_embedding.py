"""MPOEmbedding: a drop-in replacement for nn.Embedding whose table is an MPO (a tensorized embedding).

The table E (V x d) is the map from one-hot token vectors to embeddings, W = E^T (N_y = d, N_x = V),
written as an MPO with input modes (v_1..v_n) over the vocabulary and output modes (d_1..d_n) over the
embedding. V rarely factorizes well (BERT's 30,522 = 2 x 3 x 5087), so the vocabulary is padded to
the next 5-smooth number (30,720 = 32 x 30 x 32): the padded columns are zeros that no token reads.

A lookup never forms E: token i's digits (i_1..i_n) in the mixed radix of the input modes pick one
slice of each core; the left cores are merged into a table over their digits and the right ones into
another, and each token's embedding is one small (J_left x D) @ (D x J_right) product of its two rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.factorized import FactorizedLayer, whole_field
from mpocompress.nn.mpo_base import MPOCores, copied
from mpocompress.tensors import factorize, merge_cores, mpo_to_matrix, random_cores, resolve_bonds


def padded_vocab(n: int) -> int:
    """The smallest 5-smooth number (2^a 3^b 5^c) >= n: a vocabulary size with balanced mode splits."""
    if not isinstance(n, int) or n < 1:
        raise MPOCompressError(f"an embedding needs a vocabulary of at least 1 entry, got {n!r}")
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def vocab_modes(n: int, parts: int) -> tuple[int, ...]:
    """Balanced modes over the padded vocabulary of n entries."""
    return factorize(padded_vocab(n), parts)


class MPOEmbedding(MPOCores, FactorizedLayer):
    """Embedding lookup from an MPO table with cores (D_{k-1}, J_k = d_k, I_k = v_k, D_k).

    Args:
        num_embeddings, embedding_dim: V and d, as for nn.Embedding.
        bond_dim: D (each bond capped at its useful maximum) or the list of n-1 inner bond dims.
        in_modes: modes over the vocabulary (their product >= V); balanced over the padded V if omitted.
        out_modes: modes of d (their product = d); balanced if omitted.
        padding_idx: kept for the dense round trip (nn.Embedding's forward does not use it either).
        n_cores: number of cores when modes are not given.

    Random cores give entries of std 1, nn.Embedding's N(0, 1) initialisation.
    """

    kind = "embedding"
    structure = "mpo_embedding"

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bond_dim: int | Sequence[int], in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None, padding_idx: int | None = None, n_cores: int = 3,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        in_modes = tuple(in_modes) if in_modes is not None else vocab_modes(num_embeddings, n_cores)
        out_modes = tuple(out_modes) if out_modes is not None else factorize(embedding_dim, len(in_modes))
        shape = resolve_bonds(in_modes, out_modes, bond_dim)
        cores = random_cores(shape, 1.0, dtype=dtype or torch.get_default_dtype(), device=device)
        self._set_params(num_embeddings, padding_idx, cores)

    def _set_params(self, num_embeddings: int, padding_idx: int | None, cores: Sequence[torch.Tensor]) -> None:
        in_modes = tuple(int(c.shape[2]) for c in cores)
        out_modes = tuple(int(c.shape[1]) for c in cores)
        if math.prod(in_modes) < num_embeddings:
            raise MPOCompressError(f"input modes {in_modes} cover {math.prod(in_modes)} tokens, fewer than the {num_embeddings} of the vocabulary")
        if len(cores) < 2:
            raise MPOCompressError("an MPO embedding needs at least 2 cores")
        self.num_embeddings, self.embedding_dim = num_embeddings, math.prod(out_modes)
        self.padding_idx = padding_idx
        self.in_modes, self.out_modes = in_modes, out_modes
        self.cores = nn.ParameterList([nn.Parameter(c) for c in cores])
        self.register_parameter("bias", None)

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], num_embeddings: int, padding_idx: int | None = None) -> MPOEmbedding:
        """A layer holding copies of the cores (D_{k-1}, d_k, v_k, D_k) of W = E^T over the padded vocabulary."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_params(num_embeddings, padding_idx, copied(cores))
        return layer

    # ------------------------------------------------------------------ shape (the rest from MPOCores)

    @property
    def weight_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def weight_matrix(self) -> torch.Tensor:
        """W = E^T (d x V), without the padded columns; differentiable."""
        return mpo_to_matrix(list(self.cores))[:, : self.num_embeddings]

    @property
    def weight(self) -> torch.Tensor:
        """The table E (V x d), multiplied out (for code that reads `embedding.weight`)."""
        return self.weight_matrix().T

    def to_dense(self) -> nn.Embedding:
        """The equivalent nn.Embedding."""
        w = self.weight_matrix().detach()
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w.T)
        return dense

    # ------------------------------------------------------------------ metadata

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
            "in_modes": list(self.in_modes), "out_modes": list(self.out_modes), "bond_dims": self.bond_dims,
            "padding_idx": self.padding_idx, "bias": False,
        }  # fmt: skip

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        """(padded V, d): the MPO's own N_x and N_y, checked against the vocabulary and padding_idx."""
        v, d = whole_field(spec, "num_embeddings"), whole_field(spec, "embedding_dim")
        modes = spec.get("in_modes")
        if not isinstance(modes, list) or not modes or not all(type(m) is int and m >= 1 for m in modes):
            raise ValueError(f"in_modes must be a list of whole numbers >= 1, got {modes!r}")
        if not v <= math.prod(modes) < 2 * v + 64:
            raise ValueError(f"in_modes {modes} cover {math.prod(modes)} tokens for a vocabulary of {v}")
        pad = spec.get("padding_idx")
        if pad is not None and (type(pad) is not int or not -v <= pad < v):
            raise ValueError(f"padding_idx must be empty or a token index within [-{v}, {v}), got {pad!r}")
        if spec.get("bias") is not False:
            raise ValueError("an embedding has no bias (bias must be false)")
        return math.prod(modes), d

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MPOEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], bond_dim=spec["bond_dims"], in_modes=spec["in_modes"],
                   out_modes=spec["out_modes"], padding_idx=spec["padding_idx"])  # fmt: skip

    # ------------------------------------------------------------------ forward

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise MPOCompressError(f"an embedding takes integer token ids, got {ids.dtype}")
        flat = ids.reshape(-1).long()
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.num_embeddings:  # nn.Embedding refuses these too (the padded rows are not tokens)
                raise IndexError(f"token id {lo if lo < 0 else hi} is out of range for an embedding of {self.num_embeddings} tokens")
        cores = list(self.cores)
        split = len(cores) // 2
        left, right = merge_cores(cores[:split]), merge_cores(cores[split:])  # (1, J_l, V_l, D), (D, J_r, V_r, 1)
        v_right = right.shape[2]
        i_left, i_right = torch.div(flat, v_right, rounding_mode="floor"), torch.remainder(flat, v_right)
        rows_l = left[0].permute(1, 0, 2)[i_left]  # (B, J_l, D)
        rows_r = right[..., 0].permute(2, 0, 1)[i_right]  # (B, D, J_r)
        out = torch.bmm(rows_l, rows_r)  # (B, J_l, J_r): output index j = j_l * J_r + j_r
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.notation()}, {self.num_embeddings}, {self.embedding_dim}{pad}"
