"""Initial values and gauges of MPO cores: random cores at a given scale, and the balanced gauge
that conditions training. Pure tensor math: no modules, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mpocompress.tensors.shape import MPOShape


def random_cores(
    shape: MPOShape,
    target_std: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Random cores whose product W has elementwise std `target_std`.

    Each element of W is a sum over prod(D_k) paths of products of n independent core entries, so
    with entries of std s, Var(W) = prod(D_k) * s^(2n). We solve for s.
    """
    n = shape.n_cores
    s = (target_std**2 / math.prod(shape.bond_dims)) ** (1.0 / (2 * n)) if n else target_std
    return [torch.randn(*core, generator=generator, dtype=dtype, device=device) * s for core in shape.core_shapes()]


def balance_cores(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same MPO in a balanced gauge: at every bond, the SVD of the two cores it joins,
    A B = U S Vh, is split evenly, A = U sqrt(S) and B = sqrt(S) Vh (one sweep, left to right);
    then the cores are rescaled to equal Frobenius norms (scalars whose product is 1).

    TT-SVD leaves every core but the last an isometry and puts the whole norm in the last one;
    gradient steps then move the cores at very different relative rates. Balanced cores have
    comparable norms and condition training better. W is unchanged up to rounding; bond
    dimensions are kept.
    """
    cs = [c.detach().to(torch.float64) for c in cores]
    for k in range(len(cs) - 1):
        r0, j, i, r1 = cs[k].shape
        _, j2, i2, r2 = cs[k + 1].shape
        pair = cs[k].reshape(r0 * j * i, r1) @ cs[k + 1].reshape(r1, j2 * i2 * r2)
        u, s, vh = torch.linalg.svd(pair, full_matrices=False)
        keep = min(r1, s.shape[0])  # never more than the bond holds; a bond wider than its cap keeps zeros
        root = s[:keep].sqrt()
        left = torch.zeros(r0 * j * i, r1, dtype=torch.float64, device=pair.device)
        right = torch.zeros(r1, j2 * i2 * r2, dtype=torch.float64, device=pair.device)
        left[:, :keep] = u[:, :keep] * root
        right[:keep] = root[:, None] * vh[:keep]
        cs[k] = left.reshape(r0, j, i, r1)
        cs[k + 1] = right.reshape(r1, j2, i2, r2)
    norms = [float(torch.linalg.vector_norm(c)) for c in cs]
    if all(n > 0 for n in norms):  # then equal Frobenius norms: scale core k by g / |core k|, product 1
        g = math.exp(sum(math.log(n) for n in norms) / len(norms))
        cs = [c * (g / n) for c, n in zip(cs, norms)]
    return [c.to(cores[0].dtype).contiguous() for c in cs]
