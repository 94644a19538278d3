"""The ``torch`` backend: composite PyTorch ops, runs on any device.

One GEMM over all ``N*M`` rows for the base (``W0`` read once), batched GEMMs for the low-rank
delta, and the delta added in the epilogue of the second batched GEMM (``baddbmm``). The base GEMM
runs in the inputs' dtype (PyTorch's GEMMs accumulate 16-bit inputs in fp32). The rank-``r``
products ``xa = x A^T`` and ``dyb = dy B`` and everything computed from them (the delta and its
sum with the base, ``dx``'s low-rank term, ``dA``, ``dB``) are fp32 for 16-bit inputs (fp64 for
fp64), as in the fused kernels: a 16-bit ``xa`` would overflow to inf above 65504 (fp16) where the
output itself is in range. For 16-bit inputs this costs a cast of the activations to fp32 for those
products. ``dB = s dy^T xa`` is computed as ``(xa^T dy)^T``: the order in which CPU BLAS reduces the
long ``M`` dim as accurately as PyTorch's own autograd (``dy^T @ xa`` reduces it ~10x less
accurately on long inputs). This is also the ``bmm`` baseline of the benchmarks.

Every function follows the backend contract of :mod:`lora_ensemble.backends`; every op is
differentiable, which is what :mod:`lora_ensemble.ops` builds second derivatives from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import accum_dtype, in_dtype

__all__ = ["forward", "backward_dx", "backward_lora", "shrink"]


def shrink(x: Tensor, lora_A: Tensor) -> Tensor:
    """``xa = x @ A^T``: ``x [N, M, d]`` (or ``[M, d]`` shared) and ``lora_A [N, r, d]`` ->
    ``[N, M, r]`` in the accum dtype (computed from accum-dtype operands)."""
    acc = accum_dtype(x.dtype)
    # bmm for stacked rows: torch.matmul reaches the same kernel but costs ~4 µs more a call on a CPU.
    product = torch.matmul if x.dim() == 2 else torch.bmm
    return product(in_dtype(x, acc), in_dtype(lora_A, acc).transpose(1, 2))


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
    acc = accum_dtype(x.dtype)
    if weight is not None:
        start = F.linear(x, weight, bias)  # one GEMM over every row (once only when shared)
        if base is not None:
            start = start + base
    else:
        start = base if base is not None else x.new_zeros((*x.shape[:-1], lora_B.shape[1]))
        if bias is not None:
            start = start + bias
    if shared_input:
        start = start.unsqueeze(0).expand(num_members, *start.shape)
    xa = shrink(x, lora_A)
    out = torch.baddbmm(in_dtype(start, acc), xa, in_dtype(lora_B, acc).transpose(1, 2), alpha=scaling)
    return in_dtype(out, x.dtype), xa


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
    acc = accum_dtype(grad_out.dtype)
    dyb = torch.bmm(in_dtype(grad_out, acc), in_dtype(lora_B, acc))
    lora_A = in_dtype(lora_A, acc)
    if shared_input:
        flat = dyb.transpose(0, 1).reshape(rows, -1)
        if weight is None:
            dx = (flat @ lora_A.reshape(-1, d)) * scaling
        else:  # sum_n dy[n] @ W0, then the low-rank term added in the accum dtype
            dx = in_dtype(grad_out.sum(0) @ weight, acc).addmm(flat, lora_A.reshape(-1, d), alpha=scaling)
    elif weight is None:
        dx = torch.bmm(dyb, lora_A) * scaling
    else:
        base = (grad_out.reshape(-1, k) @ weight).view(num_members, rows, -1)
        dx = torch.baddbmm(in_dtype(base, acc), dyb, lora_A, alpha=scaling)
    return in_dtype(dx, grad_out.dtype), dyb


def backward_lora(
    grad_out: Tensor,
    x: Tensor,
    xa: Tensor,
    dyb: Tensor,
    scaling: float,
    shared_input: bool,
) -> tuple[Tensor, Tensor]:
    """``dA = s * dyb^T @ x [N, r, d]`` and ``dB = s * grad_out^T @ xa [N, k, r]``, in x.dtype."""
    dtype, acc = grad_out.dtype, accum_dtype(grad_out.dtype)
    product = torch.matmul if x.dim() == 2 else torch.bmm  # [N, r, M] @ [(N,) M, d]
    dA = product(dyb.transpose(1, 2), in_dtype(x, acc)) * scaling
    dB_t = torch.bmm(in_dtype(xa, acc).transpose(1, 2), in_dtype(grad_out, acc)) * scaling  # [N, r, k]
    return in_dtype(dA, dtype), in_dtype(dB_t.transpose(1, 2), dtype).contiguous()
