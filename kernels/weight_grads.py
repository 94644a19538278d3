# Gradients of the low-rank factors of every member, both in one launch:
#
#     dA[n] = scaling * dyb[n]^T @ x[n]      [R, d]
#     dB[n] = scaling * (dy[n]^T @ xa[n])    [k, R], computed as its transpose xa[n]^T @ dy[n] [R, k]
#
# Both are G = scaling * P^T @ Z with P [M, R] float32 (dyb or xa, saved by the forward / dx
# kernels) and Z [M, C] in the input dtype (x or dy): a reduction over the M rows of each member.
#
# Tiling: grid (cdiv(d, BLOCK_C) + cdiv(k, BLOCK_C), N, SPLIT). Program (t, n, j) owns a
# [BLOCK_R, BLOCK_C] tile of dA[n] (t < cdiv(d, BLOCK_C)) or of dB[n]^T (the other t), with the
# whole (padded, masked) rank in one tile, and reduces rows [j * rows_per_split, (j+1) *
# rows_per_split) of member n in BLOCK_M steps with an fp32 accumulator. With SPLIT = 1 the tile is
# scaled and stored once (deterministic); with SPLIT > 1 the partial sums are atomically added
# into float32 outputs that start at zero (fp32 reduction across programs; for 16-bit inputs the
# launcher then casts them, one more small kernel each). A shared input x is read with member
# stride 0. P is rounded to Z's dtype for the tensor-core dot; fp32 dots use DOT_PRECISION.
"""Grouped weight gradients dA and dB of all members of a LoRA ensemble, one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import block_rank, dot_precision, prune_weight_grads_configs, weight_grads_configs

__all__ = ["lowrank_weight_grads", "row_splits"]

# rows_per_split is a multiple of this (a row range ends on a 16-row boundary).
_ROWS_QUANTUM = 16
# SPLIT > 1 only when each split still reduces at least this many rows.
_MIN_ROWS_PER_SPLIT = 512


@triton.jit
def _weight_grad_tile(
    p_ptr, z_ptr, g_ptr, col_tile, row_start, row_end, RANK, COLS, scaling,
    stride_pm, stride_pr, stride_zm, stride_zc, stride_gr, stride_gc,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``G[:, tile] (+)= scaling * P[rows]^T @ Z[rows, tile]`` for rows in [row_start, row_end)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = offs_r < RANK
    c_mask = offs_c < COLS
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        p_t = tl.load(p_ptr + offs_m[None, :] * stride_pm + offs_r[:, None] * stride_pr,
                      mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_c[None, :] * stride_zc,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(p_t.to(z.dtype), z, acc, input_precision=DOT_PRECISION)
    acc *= scaling
    g_ptrs = g_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc
    g_mask = r_mask[:, None] & c_mask[None, :]
    if ATOMIC:
        tl.atomic_add(g_ptrs, acc, mask=g_mask)
    else:
        tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=g_mask)


@triton.autotune(configs=weight_grads_configs(),
                 key=["COLS_A", "COLS_B", "BLOCK_R", "rows_per_split", "ATOMIC", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_weight_grads_configs},
                 reset_to_zero=["ga_ptr", "gb_ptr"])  # the split reduction adds into zeroed outputs
@triton.jit
def _lowrank_weight_grads_kernel(
    pa_ptr, za_ptr, ga_ptr, pb_ptr, zb_ptr, gb_ptr,
    M, RANK, COLS_A, COLS_B, rows_per_split, scaling,
    stride_pa_n, stride_pa_m, stride_pa_r, stride_za_n, stride_za_m, stride_za_c,
    stride_ga_n, stride_ga_r, stride_ga_c,
    stride_pb_n, stride_pb_m, stride_pb_r, stride_zb_n, stride_zb_m, stride_zb_c,
    stride_gb_n, stride_gb_r, stride_gb_c,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    member = tl.program_id(1).to(tl.int64)
    row_start = tl.program_id(2).to(tl.int64) * rows_per_split
    row_end = min(row_start + rows_per_split, M)
    tiles_a = tl.cdiv(COLS_A, BLOCK_C)
    if tile < tiles_a:
        _weight_grad_tile(
            pa_ptr + member * stride_pa_n, za_ptr + member * stride_za_n, ga_ptr + member * stride_ga_n,
            tile, row_start, row_end, RANK, COLS_A, scaling,
            stride_pa_m, stride_pa_r, stride_za_m, stride_za_c, stride_ga_r, stride_ga_c,
            ATOMIC, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_C,
        )
    else:
        _weight_grad_tile(
            pb_ptr + member * stride_pb_n, zb_ptr + member * stride_zb_n, gb_ptr + member * stride_gb_n,
            tile - tiles_a, row_start, row_end, RANK, COLS_B, scaling,
            stride_pb_m, stride_pb_r, stride_zb_m, stride_zb_c, stride_gb_r, stride_gb_c,
            ATOMIC, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_C,
        )


def row_splits(rows: int, programs_per_split: int, device: torch.device) -> int:
    """How many row ranges the weight-gradient reduction is split into: 1 (deterministic) unless
    the (member, column tile) programs alone leave a GPU's SMs idle and every range keeps at
    least ``_MIN_ROWS_PER_SPLIT`` rows; always 1 under ``torch.use_deterministic_algorithms``."""
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(target, max(programs_per_split, 1))
    return max(1, min(wanted, rows // _MIN_ROWS_PER_SPLIT))


def lowrank_weight_grads(
    grad_out: Tensor,
    x: Tensor,
    xa: Tensor,
    dyb: Tensor,
    scaling: float,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``dA = scaling * dyb^T @ x`` and ``dB = scaling * grad_out^T @ xa`` for every member, one launch.

    Every tensor may have any strides.

    Args:
        grad_out: ``[N, M, k]``.
        x: ``[N, M, d]``, or ``[M, d]`` rows shared by every member.
        xa: ``x @ A^T [N, M, R]`` float32 (from the forward).
        dyb: ``grad_out @ B [N, M, R]`` float32 (from the dx backward).
        scaling: the LoRA scaling ``s``.
        splits: how many row ranges to reduce in separate programs (float32 atomics when > 1);
            None picks it from the shapes and the GPU (:func:`row_splits`).

    Returns:
        ``(dA [N, R, d], dB [N, k, R])`` in grad_out's dtype.
    """
    num_members, rows, k_out = grad_out.shape
    rank, d_in = xa.shape[2], x.shape[-1]
    dtype = grad_out.dtype
    if splits is None:
        splits = row_splits(rows, num_members * triton.cdiv(d_in + k_out, 128), grad_out.device)
    rows_per_split = triton.cdiv(triton.cdiv(max(rows, 1), splits), _ROWS_QUANTUM) * _ROWS_QUANTUM
    splits = triton.cdiv(max(rows, 1), rows_per_split)
    atomic = splits > 1
    out_dtype = torch.float32 if atomic else dtype
    alloc = torch.zeros if (atomic or rows == 0) else torch.empty
    grad_a = alloc((num_members, rank, d_in), device=grad_out.device, dtype=out_dtype)
    grad_b = alloc((num_members, k_out, rank), device=grad_out.device, dtype=out_dtype)
    if rows > 0:
        x3 = x.unsqueeze(0) if x.dim() == 2 else x
        stride_xn = 0 if x.dim() == 2 else x3.stride(0)
        grad_b_t = grad_b.transpose(1, 2)  # written as dB^T [N, R, k]

        def grid(cfg):
            return (triton.cdiv(d_in, cfg["BLOCK_C"]) + triton.cdiv(k_out, cfg["BLOCK_C"]), num_members, splits)

        _lowrank_weight_grads_kernel[grid](
            dyb, x3, grad_a, xa, grad_out, grad_b_t,
            rows, rank, d_in, k_out, rows_per_split, float(scaling),
            dyb.stride(0), dyb.stride(1), dyb.stride(2), stride_xn, x3.stride(1), x3.stride(2),
            grad_a.stride(0), grad_a.stride(1), grad_a.stride(2),
            xa.stride(0), xa.stride(1), xa.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            grad_b_t.stride(0), grad_b_t.stride(1), grad_b_t.stride(2),
            ATOMIC=atomic, DOT_PRECISION=dot_precision(dtype), BLOCK_R=block_rank(rank),
        )
    return grad_a.to(dtype), grad_b.to(dtype)
