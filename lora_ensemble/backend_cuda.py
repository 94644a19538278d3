"""The ``cuda`` backend: the hand-written CUDA C++ kernels of ``lora_ensemble._C``.

Importing this module loads the compiled extension and registers the fake (meta) impls of its ops;
it raises ImportError when the extension was not built or has no CUDA kernels. Every function
follows the backend contract of :mod:`lora_ensemble.backends`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the .so: registers the lora_ensemble::cuda_* ops)
from .flop_counts import register_cuda_kernel_formulas

__all__ = ["build_archs", "device_problem", "forward", "backward_dx", "backward_lora", "has_cuda_kernels"]

_OPS = ("cuda_forward", "cuda_backward_dx", "cuda_backward_lora")


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels for all three ops."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ensemble::{op}", "CUDA") for op in _OPS)


if not has_cuda_kernels():
    raise ImportError("lora_ensemble._C was built without CUDA kernels (no CUDA toolkit at build time, "
                      "or LORA_ENSEMBLE_SKIP_CUDA_BUILD=1)")
register_cuda_kernel_formulas()
# The ops' overloads, resolved once: calling an op's packet (torch.ops.lora_ensemble.cuda_forward)
# looks its overload up on every call, ~0.3 µs of host time.
_FORWARD = torch.ops.lora_ensemble.cuda_forward.default
_BACKWARD_DX = torch.ops.lora_ensemble.cuda_backward_dx.default
_BACKWARD_LORA = torch.ops.lora_ensemble.cuda_backward_lora.default


def build_archs() -> list[str]:
    """The ``TORCH_CUDA_ARCH_LIST`` entries the extension was compiled for, e.g. ``["8.0", "9.0+PTX"]``."""
    return [arch for arch in torch.ops.lora_ensemble.cuda_build_archs().split("_") if arch]


@functools.cache
def device_problem(index: int) -> str | None:
    """Why the compiled kernels cannot run on CUDA device ``index``, or None when they can: the
    extension holds no SASS for its architecture and no PTX the driver could compile for it."""
    if torch.ops.lora_ensemble.cuda_has_kernel_image(index):
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"lora_ensemble._C has no kernels for {torch.cuda.get_device_name(index)} (sm_{major}{minor}): it was "
            f"built for TORCH_CUDA_ARCH_LIST={';'.join(build_archs())}; reinstall with "
            f'TORCH_CUDA_ARCH_LIST="{major}.{minor}" (or use backend="triton")')


@torch.library.register_fake("lora_ensemble::cuda_forward")
def _forward_fake(x, weight, bias, base, lora_A, lora_B, scaling, shared_input):
    n, r = lora_A.shape[0], lora_A.shape[1]
    rows = x.shape[-2]
    return x.new_empty((n, rows, lora_B.shape[1])), x.new_empty((n, rows, r), dtype=torch.float32)


@torch.library.register_fake("lora_ensemble::cuda_backward_dx")
def _backward_dx_fake(grad_out, weight, lora_A, lora_B, scaling, shared_input):
    n, rows, _ = grad_out.shape
    dx_shape = (rows, lora_A.shape[2]) if shared_input else (n, rows, lora_A.shape[2])
    return grad_out.new_empty(dx_shape), grad_out.new_empty((n, rows, lora_A.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lora_ensemble::cuda_backward_lora")
def _backward_lora_fake(grad_out, x, xa, dyb, scaling, shared_input):
    n, _, k = grad_out.shape
    r, d = xa.shape[-1], x.shape[-1]
    return grad_out.new_empty((n, r, d)), grad_out.new_empty((n, k, r))


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scaling: float, shared_input: bool, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One fused kernel launch (with split-K, after a zero fill of its tile arrival counters):
    ``out [N, M, k]``, ``xa [N, M, r]`` fp32."""
    return _FORWARD(x, weight, bias, base, lora_A, lora_B, scaling, shared_input)


def backward_dx(grad_out: Tensor, weight: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, shared_input: bool) -> tuple[Tensor, Tensor]:
    """One fused kernel launch (with split-K, after a zero fill of its tile arrival counters):
    ``dx`` (``[N, M, d]``; shared input ``[M, d]``, summed over members), ``dyb [N, M, r]`` fp32."""
    return _BACKWARD_DX(grad_out, weight, lora_A, lora_B, scaling, shared_input)


def backward_lora(grad_out: Tensor, x: Tensor, xa: Tensor, dyb: Tensor,
                  scaling: float, shared_input: bool) -> tuple[Tensor, Tensor]:
    """One kernel launch: ``dA [N, r, d]``, ``dB [N, k, r]``."""
    return _BACKWARD_LORA(grad_out, x, xa, dyb, scaling, shared_input)
