"""The ``triton`` backend: fused Triton kernels (:mod:`lora_ensemble.kernels`).

Forward: one launch for all members (base GEMM, ``x A^T`` and the rank-``r`` update fused in one
K-loop; with a shared input the base tile is computed once and every member's update is added to
it). Backward: one fused dx launch (``dy W0 + s (dy B) A``, which also yields ``dy B``) and one
grouped launch for ``dA`` and ``dB`` of all members. fp32 inputs follow PyTorch's fp32 matmul
setting: TF32 tensor cores when it allows TF32, else 3xTF32 (about fp32 accuracy); see
:func:`lora_ensemble.kernels.configs.dot_precision`.

Inside :func:`lora_ensemble.compiling_ahead` the launchers compile their new keys and launch nothing,
and every function here returns the composite's result (:mod:`lora_ensemble.backend_torch`); during a
CUDA-graph capture there, an error (before anything is launched).

Every function follows the backend contract of :mod:`lora_ensemble.backends`.
"""

from __future__ import annotations

from torch import Tensor

from . import backend_torch
from .compile_ahead import composite_computes
from .kernels.fused_lora_gemm import launch_fused_lora_gemm
from .kernels.lora_grads import launch_lora_grads

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
    """``x [N, M, d]`` (or ``[M, d]`` shared) -> ``out [N, M, k]`` in x.dtype, ``xa [N, M, r]`` fp32."""
    # in = x, weight = W0^T [d, k], shrink = A^T [N, d, r], expand = B^T [N, r, k]: given as W0, A, B
    # (transposed=True: read with swapped strides, no views made per call).
    ahead = composite_computes()
    result = launch_fused_lora_gemm(x, weight, lora_A, lora_B, bias, scaling, base=base, transposed=True)
    return backend_torch.forward(x, weight, bias, lora_A, lora_B, scaling, shared_input, base=base) if ahead else result


def backward_dx(
    grad_out: Tensor,
    weight: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    shared_input: bool,
) -> tuple[Tensor, Tensor]:
    """``grad_out [N, M, k]`` -> ``dx [N, M, d]`` (``[M, d]`` summed over members when shared),
    ``dyb = grad_out @ B [N, M, r]`` fp32."""
    # in = dy, weight = W0 [k, d], shrink = B [N, k, r], expand = A [N, r, d].
    ahead = composite_computes()
    result = launch_fused_lora_gemm(grad_out, weight, lora_B, lora_A, None, scaling, sum_members=shared_input)
    return backend_torch.backward_dx(grad_out, weight, lora_A, lora_B, scaling, shared_input) if ahead else result


def backward_lora(
    grad_out: Tensor,
    x: Tensor,
    xa: Tensor,
    dyb: Tensor,
    scaling: float,
    shared_input: bool,
) -> tuple[Tensor, Tensor]:
    """``dA = s * dyb^T @ x [N, r, d]`` and ``dB = s * grad_out^T @ xa [N, k, r]``, in x.dtype."""
    ahead = composite_computes()
    result = launch_lora_grads(grad_out, x, xa, dyb, scaling)
    return backend_torch.backward_lora(grad_out, x, xa, dyb, scaling, shared_input) if ahead else result
