"""The readable reference of the LoRA-Ensemble linear op: the single source of truth for tests.

An ensemble of ``N`` members shares one frozen linear layer ``W0 [k, d]`` and bias ``b [k]``;
member ``n`` owns ``A[n] [r, d]`` and ``B[n] [k, r]``. For the rows ``x[n] [M, d]`` of member ``n``::

    y[n]  = x[n] @ W0^T + b + s * (x[n] @ A[n]^T) @ B[n]^T
    dx[n] = dy[n] @ W0 + s * (dy[n] @ B[n]) @ A[n]
    dA[n] = s * (dy[n] @ B[n])^T @ x[n]
    dB[n] = s * dy[n]^T @ (x[n] @ A[n]^T)
    dW0   = sum_n dy[n]^T @ x[n]            db = sum over all rows of dy

Everything here is computed in ``compute_dtype`` (float64 by default) and written out plainly,
one member at a time, so that it can be read against the formulas above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import stacked_output_shape

__all__ = [
    "ReferenceGrads",
    "lora_ensemble_reference",
    "lora_ensemble_reference_backward",
    "member_rows",
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
