"""Batch-order conversions between the paper's member-fastest layout and ours (member-major).

The reference LoRA-Ensemble code replicates its input with ``x.repeat_interleave(N, dim=0)``: row
``b*N + n`` belongs to member ``n`` (member-fastest, ``(b n)``). This package stacks member-major,
as torch-uncertainty's ensembles do: row ``n*Bsz + b`` belongs to member ``n`` (``(n b)``), so each
member's rows are one contiguous block.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["to_member_fastest", "to_member_major", "replicate_members", "stacked_output_shape"]


def _check(x: Tensor, num_members: int) -> None:
    if num_members < 1 or x.dim() < 1 or x.shape[0] % num_members != 0:
        raise ValueError(f"x's leading dim (x shape {tuple(x.shape)}) must be divisible by "
                         f"num_members={num_members}")


def to_member_major(x: Tensor, num_members: int) -> Tensor:
    """``[(Bsz N), ...]`` member-fastest (the paper's order) -> ``[(N Bsz), ...]`` member-major."""
    _check(x, num_members)
    rest = x.shape[1:]
    return x.reshape(-1, num_members, *rest).transpose(0, 1).reshape(x.shape)


def to_member_fastest(x: Tensor, num_members: int) -> Tensor:
    """``[(N Bsz), ...]`` member-major -> ``[(Bsz N), ...]`` member-fastest (the paper's order)."""
    _check(x, num_members)
    rest = x.shape[1:]
    return x.reshape(num_members, -1, *rest).transpose(0, 1).reshape(x.shape)


def replicate_members(x: Tensor, num_members: int) -> Tensor:
    """``[Bsz, ...]`` -> ``[N*Bsz, ...]``: the same batch once per member, member-major."""
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    return x.unsqueeze(0).expand(num_members, *x.shape).reshape(num_members * x.shape[0], *x.shape[1:])


def stacked_output_shape(x_shape: tuple[int, ...], num_members: int, shared_input: bool,
                         out_features: int) -> tuple[int, ...]:
    """The op's output shape for an input of ``x_shape``: ``[N*Bsz, ..., out_features]``.

    A stacked input ``[N*Bsz, ..., d]`` keeps its leading dims; a shared input ``[Bsz, ..., d]``
    gets its batch multiplied by ``num_members``.
    """
    lead = tuple(x_shape[:-1])
    if shared_input:
        lead = (num_members * lead[0], *lead[1:])
    return (*lead, out_features)
