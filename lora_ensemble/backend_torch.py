"""The ``torch`` backend: composite PyTorch ops, runs on any device.

One GEMM over all ``N*M`` rows for the base (``W0`` read once), batched GEMMs for the low-rank
delta, and the delta added in the epilogue of the second batched GEMM (``baddbmm``). Low-precision
inputs use PyTorch's GEMMs, which accumulate in fp32; the rank-``r`` intermediate ``xa`` is kept in
the accumulation dtype (fp32; fp64 for fp64 inputs). This is also the ``bmm`` baseline of the
benchmarks: what a careful PyTorch user writes.

Every function follows the backend contract of :mod:`lora_ensemble.backends`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import accum_dtype, in_dtype

__all__ = ["forward", "backward_dx", "backward_lora"]


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    shared_input: bool,
    base: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``x [N, M, d]`` (or ``[M, d]`` shared) -> ``out [N, M, k]`` in x.dtype, ``xa [N, M, r]`` in the accum dtype."""
    num_members = lora_A.shape[0]
    if weight is not None:
        start = F.linear(x, weight, bias)  # one GEMM over every row (once only when shared)
        if base is not None:
            start = start + base
    else:
        start = base if base is not None else x.new_zeros((*x.shape[:-1], lora_B.shape[1]))
        if bias is not None:
            start = start + bias
    if shared_input:
        xa = torch.matmul(x, lora_A.transpose(1, 2))  # [M, d] @ [N, d, r] -> [N, M, r]
        start = start.unsqueeze(0).expand(num_members, *start.shape)
    else:
        xa = torch.bmm(x, lora_A.transpose(1, 2))
    out = torch.baddbmm(start, xa, lora_B.transpose(1, 2), alpha=scaling)
    return out, in_dtype(xa, accum_dtype(x.dtype))


def backward_dx(
    grad_out: Tensor,
    weight: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    shared_input: bool,
) -> tuple[Tensor, Tensor]:
    """``grad_out [N, M, k]`` -> ``dx [N, M, d]`` (``[M, d]`` summed over members when shared),
    ``dyb = grad_out @ B [N, M, r]`` in the accum dtype."""
    num_members, rows, k = grad_out.shape
    d = lora_A.shape[2]
    dyb = torch.bmm(grad_out, lora_B)
    if shared_input:
        flat = dyb.transpose(0, 1).reshape(rows, -1)
        if weight is None:
            dx = (flat @ lora_A.reshape(-1, d)) * scaling
        else:
            dx = (grad_out.sum(0) @ weight).addmm(flat, lora_A.reshape(-1, d), alpha=scaling)  # sum_n dy[n] @ W0
    elif weight is None:
        dx = torch.bmm(dyb, lora_A) * scaling
    else:
        base = (grad_out.reshape(-1, k) @ weight).view(num_members, rows, -1)
        dx = torch.baddbmm(base, dyb, lora_A, alpha=scaling)
    return dx, in_dtype(dyb, accum_dtype(grad_out.dtype))


def backward_lora(
    grad_out: Tensor,
    x: Tensor,
    xa: Tensor,
    dyb: Tensor,
    scaling: float,
    shared_input: bool,
) -> tuple[Tensor, Tensor]:
    """``dA = s * dyb^T @ x [N, r, d]`` and ``dB = s * grad_out^T @ xa [N, k, r]``, in x.dtype."""
    dtype = grad_out.dtype
    dA = torch.matmul(in_dtype(dyb, dtype).transpose(1, 2), x) * scaling  # [N, r, M] @ [(N,) M, d]
    dB = torch.bmm(grad_out.transpose(1, 2), in_dtype(xa, dtype)) * scaling
    return dA, dB
