"""The ops and their autograd, each in two forms that run the same backend code.

* ``lora_ensemble::fused_linear`` (``x W0^T + b + s (x A^T) B^T``), ``lora_ensemble::lora_delta``
  (``base + s (x A^T) B^T``: the members' update over the output ``base`` of a base layer the kernels
  cannot read, e.g. a quantized one) and their shared ``lora_ensemble::fused_linear_backward``:
  ``torch.library`` custom ops with fake impls and a registered autograd formula. ``torch.compile``
  traces them as one opaque graph node each, ``opcheck`` checks them.
* :class:`FusedLinearFunction` and :class:`LoRADeltaFunction`: the same forwards and backwards as
  plain autograd Functions, for eager calls. A custom op's Python dispatch costs ~20 µs a
  call, more than the kernels of a small layer; :func:`fused_linear_apply` and
  :func:`lora_delta_apply` take the Function in eager mode and the custom op while ``torch.compile``
  traces, and call the backend directly when no gradient is needed.

Both take the backend by name and dispatch to it (:mod:`lora_ensemble.backends`), so one fake impl
and one autograd formula serve every backend. Inputs are already validated and laid out per member
(:mod:`lora_ensemble.functional` does that).

Autograd (``s`` = scaling; ``W0``, ``b`` get gradients only when they require grad)::

    dx[n] = dy[n] @ W0 + s * (dy[n] @ B[n]) @ A[n]     (summed over n for a shared input)
    dA[n] = s * (dy[n] @ B[n])^T @ x[n]
    dB[n] = s * dy[n]^T @ (x[n] @ A[n]^T)              (x A^T is saved by the forward)
    dW0   = sum_n dy[n]^T @ x[n]                       db = sum over all rows of dy

Second derivatives: a backward run with ``create_graph=True`` (grad mode on inside it) computes these
formulas with differentiable PyTorch ops, the ``torch`` backend's, whatever the backend, with
``x A^T`` recomputed with its graph, so autograd differentiates them again (Hessian-vector products,
gradient penalties, curvature approximations), eagerly through the Functions and the custom ops. Under
``torch.compile`` double backward is refused by PyTorch's AOTAutograd ("does not currently support
double backward").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import backend_torch
from .backends import accum_dtype, get_backend, in_dtype

__all__ = [
    "FusedLinearFunction",
    "LoRADeltaFunction",
    "fused_linear",
    "fused_linear_apply",
    "fused_linear_backward",
    "lora_delta",
    "lora_delta_apply",
]


def _backward_impl(grad_out: Tensor, x: Tensor, weight: Tensor | None, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                   scaling: float, shared_input: bool, backend: str, need_dx: bool,
                   need_lora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``; a gradient not asked for is an empty tensor (a distinct one each: a custom op's
    outputs may not alias)."""
    impl = get_backend(backend)
    if need_dx:
        dx, dyb = impl.backward_dx(grad_out, weight, lora_A, lora_B, scaling, shared_input)
    else:
        acc = accum_dtype(grad_out.dtype)
        dx, dyb = grad_out.new_empty(0), torch.bmm(in_dtype(grad_out, acc), in_dtype(lora_B, acc))
    if need_lora:
        dA, dB = impl.backward_lora(grad_out, x, xa, dyb, scaling, shared_input)
    else:
        dA, dB = grad_out.new_empty(0), grad_out.new_empty(0)
    return dx, dA, dB


def _differentiable_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                             _xa: Tensor, scaling: float, shared_input: bool, _backend: str, need_dx: bool,
                             need_lora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_backward_impl` built from differentiable PyTorch ops, whatever the backend: what a backward
    under ``create_graph=True`` runs, so that autograd can differentiate it again (Hessian-vector
    products, gradient penalties). ``xa = x A^T`` is recomputed with its graph (the saved one has none:
    without it the second-order terms through ``xa``, ``d(dB)/dx`` and ``d(dB)/dA``, would be lost)."""
    return _backward_impl(grad_out, x, weight, lora_A, lora_B, backend_torch.shrink(x, lora_A), scaling,
                          shared_input, "torch", need_dx, need_lora)


BackwardRunner = Callable[..., tuple[Tensor, Tensor, Tensor]]


def _lora_backward(ctx: Any, grad_out: Tensor, run_backward: BackwardRunner) -> tuple:
    """The gradients of ``(x, weight, bias, lora_A, lora_B, scaling, shared_input, backend)``, with
    ``run_backward`` the fused backward (the custom op while tracing, the backend call in eager)."""
    x, weight, lora_A, lora_B, xa = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    grad_out = grad_out.contiguous()  # the grad of .sum() is a stride-0 expand
    dx = dA = dB = dW = db = None
    if torch.is_grad_enabled():  # backward(create_graph=True): a graph of the backward, for higher derivatives
        run_backward = _differentiable_backward
    if need_x or need_A or need_B:
        dx, dA, dB = run_backward(grad_out, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.shared_input,
                                  ctx.backend, need_x, need_A or need_B)
    k = grad_out.shape[-1]
    if need_w:
        dy_rows = grad_out.sum(0) if ctx.shared_input else grad_out.reshape(-1, k)
        dW = dy_rows.T @ x.reshape(-1, x.shape[-1])
    if need_b:
        db = grad_out.reshape(-1, k).sum(0)
    return (dx if need_x else None, dW, db, dA if need_A else None, dB if need_B else None, None, None, None)


def _save(ctx: Any, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scaling: float,
          shared_input: bool, backend: str) -> None:
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
    ctx.scaling, ctx.shared_input, ctx.backend = scaling, shared_input, backend


# ---------------------------------------------------------------------------------------------
# The custom ops (torch.compile, opcheck).

@torch.library.custom_op("lora_ensemble::fused_linear", mutates_args=())
def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    shared_input: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [N, M, d]`` (shared: ``[M, d]``) -> ``(out [N, M, k], xa [N, M, r])``, xa in the accum dtype."""
    out, xa = get_backend(backend).forward(x, weight, bias, lora_A, lora_B, scaling, shared_input)
    return out, xa


def _empty_outputs(x: Tensor, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """``out [N, M, k]`` and ``xa [N, M, r]`` (accum dtype) for an input ``x [N, M, d]`` or ``[M, d]``."""
    num_members, rank = lora_A.shape[0], lora_A.shape[1]
    rows = x.shape[-2]
    return (x.new_empty((num_members, rows, lora_B.shape[1])),
            x.new_empty((num_members, rows, rank), dtype=accum_dtype(x.dtype)))


@fused_linear.register_fake
def _fused_linear_fake(x, weight, bias, lora_A, lora_B, scaling, shared_input, backend):
    return _empty_outputs(x, lora_A, lora_B)


@torch.library.custom_op("lora_ensemble::fused_linear_backward", mutates_args=())
def fused_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    shared_input: bool,
    backend: str,
    need_dx: bool,
    need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)`` of :func:`fused_linear` (and of :func:`lora_delta`: ``weight=None``, ``dx``
    without the ``dy W0`` term); a gradient not asked for is an empty tensor."""
    return _backward_impl(grad_out, x, weight, lora_A, lora_B, xa, scaling, shared_input, backend, need_dx,
                          need_lora)


@fused_linear_backward.register_fake
def _fused_linear_backward_fake(
    grad_out, x, weight, lora_A, lora_B, xa, scaling, shared_input, backend, need_dx, need_lora
):
    dx = torch.empty_like(x) if need_dx else grad_out.new_empty(0)
    if need_lora:
        return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)
    return dx, grad_out.new_empty(0), grad_out.new_empty(0)


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, _bias, lora_A, lora_B, scaling, shared_input, backend = inputs
    ctx.mark_non_differentiable(output[1])
    _save(ctx, x, weight, lora_A, lora_B, output[1], scaling, shared_input, backend)


def _op_backward(ctx: Any, grad_out: Tensor, _grad_xa: Tensor | None) -> tuple:
    return _lora_backward(ctx, grad_out, fused_linear_backward)


fused_linear.register_autograd(_op_backward, setup_context=_setup_context)


@torch.library.custom_op("lora_ensemble::lora_delta", mutates_args=())
def lora_delta(
    x: Tensor,
    base: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    shared_input: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [N, M, d]`` (shared: ``[M, d]``), ``base [N, M, k]`` (shared: ``[M, k]``) ->
    ``(out = base + s (x A^T) B^T [N, M, k], xa [N, M, r])``, xa in the accum dtype."""
    out, xa = get_backend(backend).forward(x, None, None, lora_A, lora_B, scaling, shared_input, base=base)
    return out, xa


@lora_delta.register_fake
def _lora_delta_fake(x, base, lora_A, lora_B, scaling, shared_input, backend):
    return _empty_outputs(x, lora_A, lora_B)


def _delta_backward(ctx: Any, grad_out: Tensor, run_backward: BackwardRunner) -> tuple:
    """The gradients of ``(x, base, lora_A, lora_B, scaling, shared_input, backend)``."""
    x, lora_A, lora_B, xa = ctx.saved_tensors
    need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
    grad_out = grad_out.contiguous()
    dx = dA = dB = None
    if torch.is_grad_enabled():  # backward(create_graph=True), as in _lora_backward
        run_backward = _differentiable_backward
    if need_x or need_A or need_B:
        dx, dA, dB = run_backward(grad_out, x, None, lora_A, lora_B, xa, ctx.scaling, ctx.shared_input, ctx.backend,
                                  need_x, need_A or need_B)
    dbase = (grad_out.sum(0) if ctx.shared_input else grad_out) if need_base else None
    return dx if need_x else None, dbase, dA if need_A else None, dB if need_B else None, None, None, None


def _delta_setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, _base, lora_A, lora_B, scaling, shared_input, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, lora_A, lora_B, output[1])
    ctx.scaling, ctx.shared_input, ctx.backend = scaling, shared_input, backend


def _delta_op_backward(ctx: Any, grad_out: Tensor, _grad_xa: Tensor | None) -> tuple:
    return _delta_backward(ctx, grad_out, fused_linear_backward)


lora_delta.register_autograd(_delta_op_backward, setup_context=_delta_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path.

class FusedLinearFunction(torch.autograd.Function):
    """:func:`fused_linear` (its output ``out`` only) and its backward as an ``autograd.Function``:
    the same backend calls without the custom op's dispatch."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, shared_input: bool, backend: str) -> Tensor:
        out, xa = get_backend(backend).forward(x, weight, bias, lora_A, lora_B, scaling, shared_input)
        _save(ctx, x, weight, lora_A, lora_B, xa, scaling, shared_input, backend)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        return _lora_backward(ctx, grad_out, _backward_impl)


class LoRADeltaFunction(torch.autograd.Function):
    """:func:`lora_delta` (its output ``out`` only) and its backward as an ``autograd.Function``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                shared_input: bool, backend: str) -> Tensor:
        out, xa = get_backend(backend).forward(x, None, None, lora_A, lora_B, scaling, shared_input, base=base)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.scaling, ctx.shared_input, ctx.backend = scaling, shared_input, backend
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        return _delta_backward(ctx, grad_out, _backward_impl)


def _records_grad(*tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(<generator>): a third of the cost on this hot path
        if t is not None and t.requires_grad:
            return True
    return False


def lora_delta_apply(x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, shared_input: bool,
                     backend: str) -> Tensor:
    """``out [N, M, k]`` of :func:`lora_delta`, with autograd, like :func:`fused_linear_apply`."""
    if torch.compiler.is_compiling():
        return lora_delta(x, base, lora_A, lora_B, scaling, shared_input, backend)[0]
    if _records_grad(x, base, lora_A, lora_B):
        return LoRADeltaFunction.apply(x, base, lora_A, lora_B, scaling, shared_input, backend)
    return get_backend(backend).forward(x, None, None, lora_A, lora_B, scaling, shared_input, base=base)[0]


def fused_linear_apply(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                       scaling: float, shared_input: bool, backend: str) -> Tensor:
    """``out [N, M, k]`` of the op, with autograd: the custom op under ``torch.compile``, else
    :class:`FusedLinearFunction`, or the backend alone when no gradient can flow."""
    if torch.compiler.is_compiling():
        return fused_linear(x, weight, bias, lora_A, lora_B, scaling, shared_input, backend)[0]
    if _records_grad(x, weight, bias, lora_A, lora_B):
        return FusedLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, shared_input, backend)
    return get_backend(backend).forward(x, weight, bias, lora_A, lora_B, scaling, shared_input)[0]
