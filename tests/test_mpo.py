"""Pure math against independent references: the dense matrix, torch.linalg and tensorly."""

import math

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import tt_matrix_to_matrix

from mpocompress.errors import MPOCompressError
from mpocompress.tensors import (
    bond_caps,
    bond_dims_for,
    bond_spectra,
    compression_ratio,
    contract_macs,
    entanglement_entropy,
    mpo_contract,
    MPOShape,
    mpo_to_matrix,
    random_cores,
    rebuild_macs,
    tt_round,
    tt_svd,
    unfolding_spectra,
)

SHAPES = [
    ((4, 7, 7, 4), (4, 4, 4, 4)),  # FC2 layer 1 (784 -> 256)
    ((4, 4, 4, 4), (1, 1, 10, 1)),  # FC2 layer 2 (256 -> 10), ones as modes
    ((2, 10, 10, 2), (2, 5, 6, 2)),  # LeNet-5 conv 3 as a 400 -> 120 map
    ((3, 5), (2, 7)),
    ((6,), (5,)),  # a single core is the matrix itself
]


def _unfolding(w, in_modes, out_modes, k):
    """W's k-th bond unfolding built by plain reshapes (independent of the library's code)."""
    n = len(in_modes)
    t = w.reshape(*out_modes, *in_modes)
    perm = [p for m in range(n) for p in (m, n + m)]
    return t.permute(perm).reshape(math.prod(in_modes[: k + 1]) * math.prod(out_modes[: k + 1]), -1)


@pytest.mark.parametrize("in_modes, out_modes", SHAPES)
def test_full_bond_tt_svd_reproduces_w_to_round_off(in_modes, out_modes):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=torch.float64)
    dec = tt_svd(w, in_modes, out_modes)
    assert dec.bond_dims == bond_caps(in_modes, out_modes)
    torch.testing.assert_close(mpo_to_matrix(dec.cores), w, atol=1e-10, rtol=0)
    assert dec.rel_error < 1e-12
    # tensorly rebuilds the same matrix from our cores: the core layout is the standard TT-matrix one
    rebuilt = tt_matrix_to_matrix([c.numpy() for c in dec.cores])
    torch.testing.assert_close(torch.from_numpy(rebuilt), w, atol=1e-10, rtol=0)


def test_core_layout_matches_eq5_elementwise():
    """W[j1..jn, i1..in] = w1[j1,i1] w2[j2,i2] ... wn[jn,in] as a product of D_{k-1} x D_k matrices."""
    in_modes, out_modes = (3, 2, 4), (2, 3, 2)
    w = torch.randn(12, 24, dtype=torch.float64)
    cores = tt_svd(w, in_modes, out_modes).cores
    for y, x in [(0, 0), (5, 17), (11, 23), (7, 9)]:
        js = torch.unravel_index(torch.tensor(y), out_modes)
        is_ = torch.unravel_index(torch.tensor(x), in_modes)
        prod = torch.eye(1, dtype=torch.float64)
        for c, j, i in zip(cores, js, is_):
            prod = prod @ c[:, j, i, :]
        assert abs(float(prod[0, 0]) - float(w[y, x])) < 1e-10


@pytest.mark.parametrize("in_modes, out_modes", SHAPES[:4])
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_truncation_error_is_the_discarded_weight_and_within_bound(in_modes, out_modes, d):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=torch.float64)
    dec = tt_svd(w, in_modes, out_modes, max_bond=d)
    assert dec.bond_dims == bond_dims_for(in_modes, out_modes, d)
    actual = float(torch.linalg.norm(mpo_to_matrix(dec.cores) - w) / torch.linalg.norm(w))
    discarded = math.sqrt(sum(float(s[r:].square().sum()) for s, r in zip(dec.singular_values, dec.bond_dims)))
    bound = discarded / float(torch.linalg.norm(w))
    assert actual <= bound * (1 + 1e-9) + 1e-12
    assert dec.rel_error == pytest.approx(actual, rel=1e-6, abs=1e-12)


def test_first_bond_truncation_is_optimal_like_a_truncated_svd():
    """With a single cut (n=2) TT-SVD is the Eckart-Young optimum: compare with torch.linalg.svd."""
    w = torch.randn(12, 20, dtype=torch.float64)
    dec = tt_svd(w, (4, 5), (3, 4), max_bond=3)
    s = torch.linalg.svdvals(_unfolding(w, (4, 5), (3, 4), 0))
    assert dec.rel_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-10)


def test_eps_truncation_meets_the_asked_error():
    w = torch.randn(256, 784, dtype=torch.float64)
    for eps in (0.3, 0.6, 0.9):
        dec = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), eps=eps)
        actual = float(torch.linalg.norm(mpo_to_matrix(dec.cores) - w) / torch.linalg.norm(w))
        assert actual <= eps + 1e-9
    tight = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), eps=0.3)
    loose = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), eps=0.9)
    assert sum(loose.bond_dims) < sum(tight.bond_dims)


def test_tt_svd_matches_tensorly_error():
    """Same truncation as tensorly's tensor_train_matrix gives the same error (both are TT-SVD)."""
    w = torch.randn(64, 48, dtype=torch.float64)
    in_modes, out_modes = (4, 3, 4), (4, 4, 4)
    ours = tt_svd(w, in_modes, out_modes, max_bond=5)
    with tl.backend_context("numpy"):  # never change tensorly's global backend
        theirs = tensor_train_matrix(w.reshape(*out_modes, *in_modes).numpy(), rank=[1, *ours.bond_dims, 1])
    their_err = float(torch.linalg.norm(torch.from_numpy(tt_matrix_to_matrix(theirs)) - w) / torch.linalg.norm(w))
    assert ours.rel_error == pytest.approx(their_err, rel=1e-8)


def test_bad_truncation_arguments():
    w = torch.randn(4, 4)
    with pytest.raises(MPOCompressError):
        tt_svd(w, (2, 2), (2, 2), max_bond=0)
    with pytest.raises(MPOCompressError):
        tt_svd(w, (2, 2), (2, 2), eps=1.5)
    with pytest.raises(MPOCompressError):
        tt_svd(w, (2, 3), (2, 2))
    with pytest.raises(MPOCompressError, match="NaN or Inf"):
        tt_svd(torch.full((4, 4), float("nan")), (2, 2), (2, 2))
    with pytest.raises(MPOCompressError, match="NaN or Inf"):
        tt_round([torch.full((1, 2, 2, 1), float("inf"))] * 2)


def test_paper_parameter_counts_fc2():
    """Sec. III A 1: M^{4,4,4,4}_{4,7,7,4}(2) + M^{1,1,10,1}_{4,4,4,4}(4) has 1024 weights; D=16 gives 15,584."""
    l1 = ((4, 7, 7, 4), (4, 4, 4, 4))
    l2 = ((4, 4, 4, 4), (1, 1, 10, 1))
    n2 = MPOShape.uniform(*l2, 4).param_count
    assert MPOShape.uniform(*l1, 2).param_count + n2 == 1024
    n16 = MPOShape.uniform(*l1, 16).param_count + n2
    assert n16 == 15584
    assert compression_ratio(n16, 784 * 256 + 256 * 10) < 0.08


def test_paper_parameter_counts_lenet5():
    """Sec. III A 2: the three MPOs of LeNet-5 give rho ~ 0.05."""
    layers = [((2, 10, 10, 2), (2, 5, 6, 2), 4), ((2, 5, 6, 2), (2, 3, 7, 2), 4), ((2, 3, 7, 2), (1, 5, 2, 1), 2)]
    n_mpo = sum(MPOShape.uniform(i, j, d).param_count for i, j, d in layers)
    rho = compression_ratio(n_mpo, 48000 + 10080 + 840)
    assert 0.045 < rho < 0.055


def test_eq6_for_uniform_bonds():
    """Eq. 6: N = sum_{k=2}^{n-1} I_k J_k D^2 + I_1 J_1 D + I_n J_n D when no bond is capped."""
    i, j, d = (5, 6, 7, 8), (4, 5, 6, 7), 6
    assert bond_dims_for(i, j, d) == [d] * 3
    eq6 = sum(i[k] * j[k] * d * d for k in (1, 2)) + i[0] * j[0] * d + i[3] * j[3] * d
    assert MPOShape(i, j, (d,) * 3).param_count == eq6


def test_entropy_matches_definition_and_bounds():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    lam = s**2 / (s**2).sum()
    assert entanglement_entropy(s) == pytest.approx(float(-(lam * lam.log()).sum()), rel=1e-12)
    assert entanglement_entropy(torch.ones(16)) == pytest.approx(math.log(16), rel=1e-12)  # upper bound ln D
    assert entanglement_entropy(torch.tensor([1.0, 0.0])) == 0.0


@pytest.mark.parametrize("in_modes, out_modes", SHAPES[:4])
def test_bond_spectra_are_the_singular_values_of_the_unfoldings(in_modes, out_modes):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=torch.float64)
    dec = tt_svd(w, in_modes, out_modes, max_bond=3)
    w3 = mpo_to_matrix(dec.cores)
    spectra = bond_spectra(dec.cores)
    direct = unfolding_spectra(w3, in_modes, out_modes)
    for k, (s, d) in enumerate(zip(spectra, direct)):
        ref = torch.linalg.svdvals(_unfolding(w3, in_modes, out_modes, k))
        r = len(s)
        torch.testing.assert_close(s, ref[:r], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(d[:r], ref[:r], atol=1e-9, rtol=1e-9)
        assert float(ref[r:].abs().sum()) < 1e-8  # the MPO has no weight beyond its bonds


def test_tt_round_equals_tt_svd_of_the_rebuilt_matrix():
    w = torch.randn(256, 784, dtype=torch.float64)
    big = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), max_bond=12)
    w12 = mpo_to_matrix(big.cores)
    rounded = tt_round(big.cores, max_bond=4)
    direct = tt_svd(w12, (4, 7, 7, 4), (4, 4, 4, 4), max_bond=4)
    assert rounded.bond_dims == direct.bond_dims
    assert rounded.rel_error == pytest.approx(direct.rel_error, rel=1e-6)
    torch.testing.assert_close(mpo_to_matrix(rounded.cores), mpo_to_matrix(direct.cores), atol=1e-8, rtol=1e-8)
    exact = tt_round(big.cores)  # no truncation: the same operator
    torch.testing.assert_close(mpo_to_matrix(exact.cores), w12, atol=1e-10, rtol=0)


@pytest.mark.parametrize("in_modes, out_modes", SHAPES)
def test_contraction_equals_dense_product(in_modes, out_modes):
    cores = random_cores(MPOShape.uniform(in_modes, out_modes, 3), 1.0, dtype=torch.float64)
    x = torch.randn(7, math.prod(in_modes), dtype=torch.float64)
    torch.testing.assert_close(mpo_contract(x, cores), x @ mpo_to_matrix(cores).T, atol=1e-10, rtol=1e-10)


def test_cost_model_counts():
    i, j, b = (4, 7, 7, 4), (4, 4, 4, 4), [16, 16, 16]
    # step by step by hand: B * prod(J_<k) * prod(I_>k) * D_{k-1} I_k J_k D_k
    by_hand = 196 * 1 * 4 * 4 * 16 + 4 * 28 * 16 * 7 * 4 * 16 + 16 * 4 * 16 * 7 * 4 * 16 + 64 * 16 * 4 * 4
    shape = MPOShape(i, j, b)
    assert contract_macs(shape, 1) == by_hand
    assert contract_macs(shape, 10) == 10 * by_hand
    # merge_cores joins halves: cores 1+2 (16 x 16 x 448), cores 3+4 (448 x 16 x 16), then the halves (448 x 16 x 448)
    assert rebuild_macs(shape) == (4 * 4) * 16 * (4 * 7 * 16) + (16 * 4 * 7) * 16 * (4 * 4) + (16 * 28) * 16 * (16 * 28)


def test_random_cores_scale():
    target = 0.05
    cores = random_cores(MPOShape((4, 7, 7, 4), (4, 4, 4, 4), (8, 8, 8)), target, generator=torch.Generator().manual_seed(1))
    std = float(mpo_to_matrix(cores).std())
    assert abs(std / target - 1) < 0.2


@pytest.mark.parametrize("method", ["gram", "auto"])
@pytest.mark.parametrize(
    "shape,in_modes,out_modes,d",
    [((64, 96), (4, 4, 6), (4, 4, 4), 5), ((120, 36), (3, 3, 4), (5, 4, 6), 7), ((40, 40), (2, 2, 2, 5), (2, 2, 2, 5), 3)],
)
def test_gram_tt_svd_matches_exact_svd(method, shape, in_modes, out_modes, d, monkeypatch):
    """The Gram path keeps the SVD's subspaces: same bond dims, relative error within 1.001x of the
    exact TT-SVD's, orthonormal left cores, and the same singular values (float64)."""
    import mpocompress.tensors.decompose as mpo_mod

    monkeypatch.setattr(mpo_mod, "_BLOCK", 97)  # force the block-by-block Gram accumulation
    torch.manual_seed(0)
    w = torch.randn(*shape)
    exact = tt_svd(w, in_modes, out_modes, max_bond=d, method="svd")
    fast = tt_svd(w, in_modes, out_modes, max_bond=d, method=method)
    assert fast.bond_dims == exact.bond_dims
    err = float(torch.linalg.norm(mpo_to_matrix(fast.cores).double() - w.double()) / torch.linalg.norm(w.double()))
    assert err <= 1.001 * exact.rel_error
    assert fast.rel_error == pytest.approx(err, rel=1e-4)
    for s_fast, s_exact in zip(fast.singular_values, exact.singular_values):
        torch.testing.assert_close(s_fast[: d + 2], s_exact[: d + 2], rtol=1e-6, atol=1e-9)
    for core in fast.cores[:-1]:
        u = core.double().reshape(-1, core.shape[3])
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)


def test_auto_falls_back_to_exact_svd_for_nearly_exact_factorizations():
    """A matrix that is an MPO of bond 3 plus 1e-7 noise: 'auto' must keep the exact SVD's tiny
    error, which a float64 Gram matrix cannot resolve."""
    torch.manual_seed(0)
    cores = random_cores(MPOShape((4, 4, 4), (4, 4, 4), (3, 3)), 1.0, dtype=torch.float64)
    w = mpo_to_matrix(cores) + 1e-9 * torch.randn(64, 64, dtype=torch.float64)
    exact = tt_svd(w, (4, 4, 4), (4, 4, 4), max_bond=3, method="svd")
    auto = tt_svd(w, (4, 4, 4), (4, 4, 4), max_bond=3, method="auto")
    gram = tt_svd(w, (4, 4, 4), (4, 4, 4), max_bond=3, method="gram")
    assert not all(torch.equal(a, b) for a, b in zip(gram.cores, exact.cores))  # Gram rounds differently
    assert all(torch.equal(a, b) for a, b in zip(auto.cores, exact.cores))  # auto took the exact SVD
    err = float(torch.linalg.norm(mpo_to_matrix(auto.cores) - w) / torch.linalg.norm(w))
    assert err <= 1.001 * exact.rel_error


def test_unknown_tt_method_is_an_error():
    with pytest.raises(MPOCompressError, match="method"):
        tt_svd(torch.randn(4, 4), (2, 2), (2, 2), max_bond=2, method="qr")


def test_grouped_macs_and_merge_cores_agree_with_the_dense_matrix():
    torch.manual_seed(0)
    from mpocompress.tensors import grouped_macs, merge_cores

    shape = MPOShape((2, 3, 4), (3, 2, 2), (2, 3))
    cores = random_cores(shape, 1.0, dtype=torch.float64)
    w = mpo_to_matrix(cores)
    merged = merge_cores(cores[:2])
    assert merged.shape == (1, 6, 6, 3)
    torch.testing.assert_close(mpo_to_matrix([merged, cores[2]]), w)
    assert grouped_macs(shape, (3,), 5, merged_cached=True) == 5 * 24 * 12
    assert grouped_macs(shape, (1, 1, 1), 7) == contract_macs(shape, 7)


@pytest.mark.parametrize("sizes", [(2, 3), (3, 2), (1, 4), (4, 1), (2, 1, 2), (1, 2, 2)])
def test_groups_merged_for_the_contraction_are_the_same_numbers_in_place(sizes):
    """`merge_cores(..., for_contraction=True)` gives the usual merged core as a view whose memory
    is (D_a, I, J, D_b): the matrix each contraction step multiplies by is then a view, no copy,
    and contracting through such groups equals the dense product (float64)."""
    from mpocompress.tensors import merge_cores, mpo_contract

    torch.manual_seed(0)
    shape = MPOShape((2, 3, 4, 2, 3), (3, 2, 2, 4, 2), (2, 3, 4, 3))
    cores = random_cores(shape, 1.0, dtype=torch.float64)
    groups, laid, k = [], [], 0
    for m in sizes:
        groups.append(merge_cores(cores[k : k + m]))
        laid.append(merge_cores(cores[k : k + m], for_contraction=True))
        k += m
    for m, g, lo in zip(sizes, groups, laid):
        assert lo.shape == g.shape
        torch.testing.assert_close(lo, g, rtol=0, atol=1e-12)
        if m > 1:  # a merged group (a lone core is the core itself)
            assert lo.transpose(1, 2).is_contiguous()  # memory (D_a, I, J, D_b)
            da, j, i, db = lo.shape
            mat = lo.permute(1, 3, 0, 2).reshape(j * db, da * i)  # what a middle step multiplies by
            assert mat.data_ptr() == lo.data_ptr()
            if db == 1:  # the last step's (D_a I) x J
                assert lo.permute(0, 2, 1, 3).reshape(da * i, j).data_ptr() == lo.data_ptr()
    x = torch.randn(3, shape.nx, dtype=torch.float64)
    ref = x @ mpo_to_matrix(cores).T
    for forms in (["fold"] * (len(sizes) - 1), ["bmm"] * (len(sizes) - 1)):
        torch.testing.assert_close(mpo_contract(x, laid, forms), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mpo_contract(x[:1], laid, forms), ref[:1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_modes, out_modes, d", [((4, 7, 7, 4), (4, 4, 4, 4), 4), ((3, 5, 2), (2, 6, 4), 6)])
def test_first_step_read_from_w_equals_the_step_on_the_permuted_unfolding(in_modes, out_modes, d, monkeypatch):
    """The first TT-SVD step is computed from blocks of W, without the permuted copy of W: the same
    spectrum, subspace and remainder as `_split` on the explicitly permuted unfolding."""
    import mpocompress.tensors.decompose as mpo_mod

    monkeypatch.setattr(mpo_mod, "_BLOCK", 211)  # several blocks, the last one partial
    torch.manual_seed(0)
    w = torch.randn(math.prod(out_modes), math.prod(in_modes))
    n = len(in_modes)
    unfolding = w.reshape(*out_modes, *in_modes).permute(mpo_mod._interleave_perm(n)).reshape(out_modes[0] * in_modes[0], -1)
    u_ref, rest_ref, s_ref = mpo_mod._split(unfolding, d, 0.0, "gram")
    u, rest, s = mpo_mod._split_first(w, out_modes, in_modes, d, 0.0, "gram")
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u @ rest, u_ref @ rest_ref, rtol=1e-10, atol=1e-10)  # the same rank-d projection
    torch.testing.assert_close(u @ u.T, u_ref @ u_ref.T, rtol=1e-10, atol=1e-10)
    assert mpo_mod._split_first(w, out_modes, in_modes, d, 0.0, "svd") is None  # exact SVD asked: not this path


def test_frobenius_norm_is_float64_accurate_for_large_float32_tensors():
    from mpocompress.tensors import frobenius_norm

    torch.manual_seed(0)
    w = torch.randn(3_000_017) * 10  # rows of 65,536 plus a tail
    exact = float(w.double().norm())
    assert frobenius_norm(w) == pytest.approx(exact, rel=1e-6)
    assert frobenius_norm(w[:100]) == pytest.approx(float(w[:100].double().norm()), rel=1e-6)  # tail only


def test_shared_bmm_backward_equals_autograd_of_the_expanded_bmm():
    """The hand-written backward of the bmm step (grad of the shared matrix summed chunk by chunk,
    here over 3 chunks of 256 slices and a partial one) against autograd's, float64."""
    from mpocompress.tensors.contract import _SharedBmm

    torch.manual_seed(0)
    a = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(600, 8, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(600, 64, 64, dtype=torch.float64)
    out = _SharedBmm.apply(a, t)
    ga, gt = torch.autograd.grad(out, (a, t), g)
    ref = torch.bmm(a.expand(600, 64, 8), t)
    ra, rt = torch.autograd.grad(ref, (a, t), g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ga, ra, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gt, rt, rtol=1e-12, atol=1e-10)
    (only_t,) = torch.autograd.grad(_SharedBmm.apply(a.detach(), t), (t,), g)  # no gradient asked for a
    torch.testing.assert_close(only_t, rt, rtol=1e-12, atol=1e-10)


def test_contraction_in_row_chunks_equals_the_whole_batch(monkeypatch):
    """On the CPU, mpo_contract takes rows in chunks that keep intermediates in cache: the result
    and the gradients equal those of one pass over all rows (float64), with a partial last chunk."""
    import mpocompress.tensors.contract as mpo_mod

    torch.manual_seed(0)
    cores = [c.requires_grad_() for c in random_cores(MPOShape((4, 3, 5), (2, 6, 3), (4, 5)), 1.0, dtype=torch.float64)]
    x = torch.randn(23, 60, dtype=torch.float64, requires_grad=True)
    g = torch.randn(23, 36, dtype=torch.float64)
    whole = mpo_contract(x, cores, ["bmm", "fold"])
    ref = torch.autograd.grad(whole, [x, *cores], g)
    assert mpo_mod._largest_intermediate(cores) == max(2 * 4 * 15, 2 * 6 * 5 * 5)
    monkeypatch.setattr(mpo_mod, "_CHUNK_NUMBERS", 5 * 300)  # 5 rows per chunk: 5 chunks, the last of 3 rows
    chunked = mpo_contract(x, cores, ["bmm", "fold"])
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(chunked, [x, *cores], g), ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, scale", [(torch.float16, 400.0), (torch.bfloat16, 1.0), (torch.bfloat16, 1e30)])
def test_reported_error_is_right_in_half_precision(dtype, scale):
    """||W|| of a float16 matrix overflows in float16 (it was inf: every bond cut to 1 and a reported
    error of 0); norms are taken in float32 and summed in float64."""
    torch.manual_seed(0)
    w = (torch.randn(256, 784) * scale).to(dtype)
    from mpocompress.tensors import frobenius_norm

    assert frobenius_norm(w) == pytest.approx(float(torch.linalg.norm(w.double())), rel=1e-5)
    dec = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), eps=0.5)
    real = float(torch.linalg.norm(mpo_to_matrix([c.double() for c in dec.cores]) - w.double()) / torch.linalg.norm(w.double()))
    assert dec.bond_dims != [1, 1, 1] and dec.rel_error <= 0.5
    assert dec.rel_error == pytest.approx(real, abs=2e-3)  # the cores are rounded to the input's dtype


@pytest.mark.parametrize("method", ["auto", "svd"])
@pytest.mark.parametrize(
    "shape, in_modes, out_modes",
    [((384, 384), (4, 4, 6, 4), (4, 4, 6, 4)), ((1536, 384), (4, 4, 6, 4), (4, 8, 8, 6)),
     ((384, 1536), (4, 8, 8, 6), (4, 4, 6, 4)), ((12, 10), (2, 5), (3, 4)), ((256, 784), (4, 7, 7, 4), (4, 4, 4, 4))],
)  # fmt: skip
def test_a_sweep_over_d_equals_one_tt_svd_per_d_bit_for_bit(shape, in_modes, out_modes, method):
    """`analyze`'s D sweep shares the steps the Ds have in common; each result is tt_svd's own, to the bit."""
    from mpocompress.tensors import tt_svd_sweep

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    ds = (2, 4, 8, 16, 32, 1000)
    swept = tt_svd_sweep(w, in_modes, out_modes, ds, method=method)
    for d in ds:
        ref = tt_svd(w, in_modes, out_modes, max_bond=d, method=method)
        got = swept[d]
        assert got.bond_dims == ref.bond_dims and got.rel_error == ref.rel_error
        assert all(torch.equal(a, b) for a, b in zip(got.cores, ref.cores, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got.singular_values, ref.singular_values, strict=True))
    with pytest.raises(MPOCompressError, match="bond dimension"):
        tt_svd_sweep(w, in_modes, out_modes, (4, 0))


def test_analyze_sweeps_each_dense_layer_once_for_all_d(monkeypatch):
    """A guard on work done, not time: `analyze` without a D makes one TT-SVD sweep per layer (not
    one TT-SVD per layer and D), and its sweep rows equal per-D TT-SVDs."""
    import importlib

    from mpocompress import build_model

    analyze_module = importlib.import_module("mpocompress.compress.analyze")
    decompose_module = importlib.import_module("mpocompress.tensors.decompose")

    calls = {"sweep": 0, "tt_svd": 0}
    sweep, single = analyze_module.tt_svd_sweep, decompose_module.tt_svd

    def counted_sweep(*a, **k):
        calls["sweep"] += 1
        return sweep(*a, **k)

    def counted_single(*a, **k):
        calls["tt_svd"] += 1
        return single(*a, **k)

    monkeypatch.setattr(analyze_module, "tt_svd_sweep", counted_sweep)
    monkeypatch.setattr("mpocompress.compress.targets.tt_svd", counted_single)
    torch.manual_seed(0)
    model = build_model("fc2")
    report = analyze_module.analyze(model)
    assert calls == {"sweep": len(report.layers), "tt_svd": 0}
    for sub in report.sweep:
        for lr in sub.layers:
            w = dict(model.named_modules())[lr.name].weight
            ref = single(w, lr.in_modes, lr.out_modes, max_bond=sub.bond_dim)
            assert lr.rel_error == pytest.approx(ref.rel_error, rel=1e-12)
