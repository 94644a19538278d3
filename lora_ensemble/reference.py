"""The readable reference of the LoRA-Ensemble linear op: the single source of truth for tests.

An ensemble of ``N`` members shares one frozen linear layer ``W0 [k, d]`` and bias ``b [k]``;
member ``n`` owns ``A[n] [r, d]`` and ``B[n] [k, r]``. For the rows ``x[n] [M, d]`` of member ``n``::

    y[n]  = x[n] @ W0^T + b + s * (x[n] @ A[n]^T) @ B[n]^T
    dx[n] = dy[n] @ W0 + s * (dy[n] @ B[n]) @ A[n]
    dA[n] = s * (dy[n] @ B[n])^T @ x[n]
    dB[n] = s * dy[n]^T @ (x[n] @ A[n]^T)
    dW0   = sum_n dy[n]^T @ x[n]            db = sum over all rows of dy

The delta op (``lora_ensemble_delta``: the members' update over the output ``base`` of a base layer
the kernels cannot read) is the same with ``W0 = 0`` and no bias, plus ``base``; ``d base = dy``
(summed over members for a shared input).

Everything here is computed in ``compute_dtype`` (float64 by default) and written out plainly,
one member at a time, so that it can be read against the formulas above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import stacked_output_shape

__all__ = [
    "DeltaReferenceGrads",
    "ReferenceGrads",
    "lora_delta_reference",
    "lora_delta_reference_backward",
    "lora_ensemble_reference",
    "lora_ensemble_reference_backward",
    "member_rows",
    "relative_error",
]


def member_rows(x: Tensor, num_members: int, shared_input: bool) -> Tensor:
    """View the user layout as per-member rows.

    Args:
        x: stacked ``[N*Bsz, ..., d]`` (member-major) or, with ``shared_input``, ``[Bsz, ..., d]``.
        num_members: ``N``.
        shared_input: whether every member sees the same ``x``.

    Returns:
        ``[N, M, d]`` where ``M`` is the number of rows per member (a broadcast view when shared).
    """
    d = x.shape[-1]
    if shared_input:
        rows = x.reshape(-1, d)
        return rows.unsqueeze(0).expand(num_members, rows.shape[0], d)
    return x.reshape(num_members, -1, d)


def lora_ensemble_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Forward of the op, member by member, in ``compute_dtype``.

    Args:
        x: ``[N*Bsz, ..., d]`` stacked, or ``[Bsz, ..., d]`` with ``shared_input``.
        weight: ``W0 [k, d]``.
        bias: ``[k]`` or None.
        lora_A: ``[N, r, d]``.
        lora_B: ``[N, k, r]``.
        scaling: ``s``.
        shared_input: every member sees the same ``x``.
        compute_dtype: the dtype every input is cast to before any arithmetic.

    Returns:
        ``[N*Bsz, ..., k]`` in ``compute_dtype``.
    """
    num_members = lora_A.shape[0]
    c = compute_dtype
    xs = member_rows(x.to(c), num_members, shared_input)
    outs = []
    for n in range(num_members):
        y = xs[n] @ weight.to(c).T
        if bias is not None:
            y = y + bias.to(c)
        y = y + scaling * ((xs[n] @ lora_A[n].to(c).T) @ lora_B[n].to(c).T)
        outs.append(y)
    return torch.stack(outs).reshape(stacked_output_shape(x.shape, num_members, shared_input, weight.shape[0]))


@dataclass
class ReferenceGrads:
    """Gradients of the op, each in ``compute_dtype`` and in its input's shape."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    lora_A: Tensor
    lora_B: Tensor


def lora_ensemble_reference_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> ReferenceGrads:
    """Backward of the op by the closed-form formulas of the module docstring.

    Args:
        grad_out: ``[N*Bsz, ..., k]``, the gradient of the output.
        x, weight, lora_A, lora_B, scaling, shared_input: as in :func:`lora_ensemble_reference`.
        compute_dtype: the dtype every input is cast to before any arithmetic.

    Returns:
        :class:`ReferenceGrads` with ``x`` shaped like ``x`` (summed over members when shared),
        ``weight [k, d]``, ``bias [k]``, ``lora_A [N, r, d]``, ``lora_B [N, k, r]``.
    """
    num_members = lora_A.shape[0]
    c = compute_dtype
    s = scaling
    w = weight.to(c)
    xs = member_rows(x.to(c), num_members, shared_input)
    dys = grad_out.to(c).reshape(num_members, -1, w.shape[0])
    dx, dA, dB = [], [], []
    dW = torch.zeros_like(w)
    for n in range(num_members):
        a, b, xn, dy = lora_A[n].to(c), lora_B[n].to(c), xs[n], dys[n]
        dyb = dy @ b
        dx.append(dy @ w + s * dyb @ a)
        dA.append(s * dyb.T @ xn)
        dB.append(s * dy.T @ (xn @ a.T))
        dW = dW + dy.T @ xn
    dx_all = torch.stack(dx)
    dx_all = dx_all.sum(0) if shared_input else dx_all
    return ReferenceGrads(
        x=dx_all.reshape(x.shape),
        weight=dW,
        bias=dys.reshape(-1, w.shape[0]).sum(0),
        lora_A=torch.stack(dA),
        lora_B=torch.stack(dB),
    )


def _zero_weight(x: Tensor, lora_B: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``W0 = 0 [k, d]``: the delta op is the fused op without a base product."""
    return torch.zeros(lora_B.shape[1], x.shape[-1], dtype=compute_dtype, device=x.device)


def lora_delta_reference(
    x: Tensor,
    base: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Forward of the delta op, ``base + s (x A^T) B^T`` for every member, in ``compute_dtype``.

    Args:
        x: ``[N*Bsz, ..., d]`` stacked, or ``[Bsz, ..., d]`` with ``shared_input``.
        base: the base layer's output, ``x``'s shape with ``k`` as the last dim.
        lora_A, lora_B, scaling, shared_input, compute_dtype: as in :func:`lora_ensemble_reference`.

    Returns:
        ``[N*Bsz, ..., k]`` in ``compute_dtype`` (a shared ``base`` added to every member's rows).
    """
    num_members = lora_A.shape[0]
    delta = lora_ensemble_reference(x, _zero_weight(x, lora_B, compute_dtype), None, lora_A, lora_B, scaling,
                                    shared_input, compute_dtype)
    return delta + member_rows(base.to(compute_dtype), num_members, shared_input).reshape(delta.shape)


@dataclass
class DeltaReferenceGrads:
    """Gradients of the delta op, each in ``compute_dtype`` and in its input's shape."""

    x: Tensor
    base: Tensor
    lora_A: Tensor
    lora_B: Tensor


def lora_delta_reference_backward(
    grad_out: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> DeltaReferenceGrads:
    """Backward of the delta op: :func:`lora_ensemble_reference_backward` with ``W0 = 0``, and
    ``d base = dy`` (summed over members when shared).

    Args:
        grad_out: ``[N*Bsz, ..., k]``, the gradient of the output.
        x, lora_A, lora_B, scaling, shared_input, compute_dtype: as in :func:`lora_delta_reference`.

    Returns:
        :class:`DeltaReferenceGrads`: ``x`` and ``base`` in their inputs' shapes (``base`` is ``x``'s
        shape with ``k`` last), ``lora_A [N, r, d]``, ``lora_B [N, k, r]``.
    """
    num_members, k = lora_A.shape[0], lora_B.shape[1]
    grads = lora_ensemble_reference_backward(grad_out, x, _zero_weight(x, lora_B, compute_dtype), lora_A, lora_B,
                                             scaling, shared_input, compute_dtype)
    dys = grad_out.to(compute_dtype).reshape(num_members, -1, k)
    dbase = dys.sum(0) if shared_input else dys
    return DeltaReferenceGrads(x=grads.x, base=dbase.reshape(*x.shape[:-1], k), lora_A=grads.lora_A,
                               lora_B=grads.lora_B)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max_i |actual_i - expected_i| / (RMS(expected) + |expected_i|)``, compared in float64 on
    ``expected``'s device: each element's error relative to its own size, floored by the tensor's RMS
    where it is near zero (cancellation). Rounding to a dtype of unit roundoff ``u`` gives at most
    ``u``, whatever the tensor's shape or the spread of its values. NaN when ``actual`` is not finite
    where ``expected`` is; 0 for empty tensors."""
    if actual.shape != expected.shape:
        raise ValueError(f"relative_error: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    e = expected.detach().to(torch.float64)
    a = actual.detach().to(e.device, torch.float64)
    if not torch.isfinite(a[torch.isfinite(e)]).all():
        return float("nan")
    scale = e.pow(2).mean().sqrt().clamp_min(1e-30)
    return float(((a - e).abs() / (scale + e.abs())).max().item())
