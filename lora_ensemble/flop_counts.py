"""FLOP formulas of the op for ``torch.utils.flop_counter.FlopCounterMode``.

For ``N`` members, ``M`` rows per member, ``d`` in, ``k`` out and rank ``r`` (a multiply-add is 2
FLOPs, as FlopCounterMode counts ``mm``)::

    forward      2NMdk + 2NMr(d + k)             shared input: 2Mdk + 2NMr(d + k)
    backward dx  2NMdk + 2NMr(d + k)             dy W0 + (dy B) A; shared: dy summed, 2Mdk + 2NMr(d + k)
    backward dA  2NMrd, and dy B (2NMrk) when dx was not asked for
    backward dB  2NMrk

``lora_ensemble::lora_delta`` (the update over a base layer's output) and the backward without
``W0`` leave out the ``2NMdk`` (``2Mdk``) terms: the base layer's own FLOPs are counted where it runs.

What a ``FlopCounterMode`` counts (it is a ``TorchDispatchMode``: it sees dispatcher ops only):

* ``torch.ops.lora_ensemble.fused_linear`` / ``fused_linear_backward`` (``torch.compile`` traces the op
  as these, and direct calls): this module's formulas, any backend.
* Eager calls with the ``torch`` backend: the aten ops it runs (``mm``, ``bmm``, ``baddbmm``), which
  add up to the same numbers.
* Eager calls with the ``cuda`` backend: its ``lora_ensemble::cuda_*`` ops, once
  :func:`register_cuda_kernel_formulas` ran after the extension loaded (the ops do not exist before).
* Eager calls with the ``triton`` backend: nothing. Its kernels are launched from Python, not
  through the dispatcher, so the mode never sees them (count with ``torch.compile``, or with the
  formulas of :func:`forward_flops` and :func:`backward_flops`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import ops  # noqa: F401  (registers the ops the formulas are for)

__all__ = ["backward_flops", "forward_flops", "register_cuda_kernel_formulas"]

Shape = torch.Size | tuple[int, ...]


def forward_flops(x_shape: Shape, weight_shape: Shape | None, lora_A_shape: Shape, shared_input: bool,
                  out_features: int | None = None) -> int:
    """FLOPs of the forward: ``x [N, M, d]`` (shared: ``[M, d]``), ``weight [k, d]`` (None: no
    ``x W0^T``, and ``k = out_features``), ``lora_A [N, r, d]``."""
    num_members, rank, d = lora_A_shape
    k = weight_shape[0] if weight_shape is not None else out_features
    rows = x_shape[-2]
    base_rows = rows if shared_input else num_members * rows
    base = 2 * base_rows * d * k if weight_shape is not None else 0
    return base + 2 * num_members * rows * rank * (d + k)


def backward_flops(grad_out_shape: Shape, weight_shape: Shape | None, lora_A_shape: Shape, shared_input: bool,
                   need_dx: bool, need_lora: bool) -> int:
    """FLOPs of :func:`lora_ensemble.ops.fused_linear_backward`: ``grad_out [N, M, k]``, ``weight [k, d]``
    (None: no ``dy W0``), ``lora_A [N, r, d]``; ``dy B`` is computed once and serves both dx and dA."""
    num_members, rows, k = grad_out_shape
    rank, d = lora_A_shape[1], lora_A_shape[2]
    lora_rows = num_members * rows
    flops = 2 * lora_rows * k * rank  # dy B
    if need_dx:
        if weight_shape is not None:
            flops += 2 * (rows if shared_input else lora_rows) * k * d  # dy W0
        flops += 2 * lora_rows * rank * d  # (dy B) A
    if need_lora:
        flops += 2 * lora_rows * rank * d + 2 * lora_rows * k * rank  # dA, dB
    return flops


def _fused_linear_flops(x_shape, weight_shape, _bias_shape, lora_A_shape, _lora_B_shape, _scaling, shared_input,
                        _backend, **_kwargs) -> int:
    return forward_flops(x_shape, weight_shape, lora_A_shape, shared_input)


def _lora_delta_flops(x_shape, _base_shape, lora_A_shape, lora_B_shape, _scaling, shared_input, _backend,
                      **_kwargs) -> int:
    return forward_flops(x_shape, None, lora_A_shape, shared_input, out_features=lora_B_shape[1])


def _cuda_forward_flops(x_shape, weight_shape, _bias_shape, _base_shape, lora_A_shape, lora_B_shape, _scaling,
                        shared_input, **_kwargs) -> int:
    return forward_flops(x_shape, weight_shape, lora_A_shape, shared_input, out_features=lora_B_shape[1])


def _fused_linear_backward_flops(grad_out_shape, _x_shape, weight_shape, lora_A_shape, _lora_B_shape, _xa_shape,
                                 _scaling, shared_input, _backend, need_dx, need_lora, **_kwargs) -> int:
    return backward_flops(grad_out_shape, weight_shape, lora_A_shape, shared_input, need_dx, need_lora)


def _cuda_backward_dx_flops(grad_out_shape, weight_shape, lora_A_shape, _lora_B_shape, _scaling, shared_input,
                            **_kwargs) -> int:
    return backward_flops(grad_out_shape, weight_shape, lora_A_shape, shared_input, need_dx=True, need_lora=False)


def _cuda_backward_lora_flops(grad_out_shape, x_shape, xa_shape, _dyb_shape, _scaling, _shared_input,
                              **_kwargs) -> int:
    num_members, rows, k = grad_out_shape
    return 2 * num_members * rows * xa_shape[-1] * (x_shape[-1] + k)  # dA and dB (dy B came from the dx kernel)


register_flop_formula(torch.ops.lora_ensemble.fused_linear)(_fused_linear_flops)
register_flop_formula(torch.ops.lora_ensemble.lora_delta)(_lora_delta_flops)
register_flop_formula(torch.ops.lora_ensemble.fused_linear_backward)(_fused_linear_backward_flops)


def register_cuda_kernel_formulas() -> bool:
    """Register the formulas of the CUDA extension's ops (``lora_ensemble::cuda_forward``,
    ``cuda_backward_dx``, ``cuda_backward_lora``) once they exist; True when they are registered.

    :mod:`lora_ensemble.backend_cuda` calls it when it loads the extension; a second call does
    nothing. Only ``FlopCounterMode`` objects created afterwards use the formulas.
    """
    lib = torch.ops.lora_ensemble
    if not hasattr(lib, "cuda_forward"):
        return False
    if lib.cuda_forward not in torch.utils.flop_counter.flop_registry:
        register_flop_formula(lib.cuda_forward)(_cuda_forward_flops)
        register_flop_formula(lib.cuda_backward_dx)(_cuda_backward_dx_flops)
        register_flop_formula(lib.cuda_backward_lora)(_cuda_backward_lora_flops)
    return True
