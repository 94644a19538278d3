# Fused "GEMM plus per-member low-rank update", one launch for all N members:
#
#     P[n] = X[n] @ S[n]                                  [M, R]  fp32, stored
#     Y[n] = X[n] @ W + bias + scaling * P[n] @ E[n]      [M, C]  one rounding at the store
#
# with X [N, M, K], W [K, C] shared, S [N, K, R], E [N, R, C] (any strides). The LoRA-Ensemble
# forward is X = x, W = W0^T, S = A^T, E = B^T, P = xa; the dx backward is X = dy, W = W0, S = B,
# E = A, P = dyb, so one kernel serves both.
#
# Tiling (stacked kernel): grid (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N), N), tiles of one member
# visited in grouped (GROUP_M) order for L2 reuse of W. One K-loop feeds the same X tile to two
# dots: X W into a [BLOCK_M, BLOCK_N] fp32 accumulator and X S into a [BLOCK_M, BLOCK_R] fp32
# accumulator (BLOCK_R: rank padded to a power of two >= 16, masked). The epilogue adds
# (scaling * P) E into the first accumulator with one more dot of depth BLOCK_R, adds the bias and
# stores once; the programs of the first column tile also store P.
#
# Shared-rows kernel (grid (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N), G)): the base tile X W is computed
# once per member group and each member's update is added to it in a loop over the group's members
# (each re-reads its X tile for its own X S[n] K-loop), so N members cost G base GEMMs plus N
# rank-r updates. G = 1 unless the tiles alone leave a GPU mostly idle (small batches):
#   forward, shared input (SUM_MEMBERS=False): X [M, K] read by every member, Y [N, M, C];
#   dx backward, shared input (SUM_MEMBERS=True): Y [M, C] = (sum_n X[n]) W + scaling * sum_n P[n] E[n],
#   the member sum of the X tiles taken in fp32 inside the K-loop.
#
# Precision: all accumulators are fp32; scaling * P is rounded to the input dtype for the rank-R
# tensor-core dot (as a 16-bit LoRA does). fp32 inputs run every dot with DOT_PRECISION: "tf32"
# when PyTorch allows TF32 matmuls, else "tf32x3" (configs.dot_precision).
"""Fused base GEMM + per-member low-rank update (forward and dx backward of a LoRA ensemble)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import (
    block_rank,
    dot_precision,
    fused_matmul_block_rows,
    fused_matmul_configs,
    prune_fused_matmul_configs,
    shared_rows_configs,
)

__all__ = ["fused_lowrank_matmul", "member_groups_for"]

_TUNING_KEY = ["BLOCK_M", "N_COLS", "K_DIM", "BLOCK_R", "DOT_PRECISION"]


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile (row, column) of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns
    together, so a column strip of W stays in L2 while they use it."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lowrank_update(acc, p, e_ptr, offs_r, offs_n, RANK, N_COLS, scaling, stride_er, stride_ec,
                    DOT_PRECISION: tl.constexpr):
    """``acc + scaling * p @ E`` for one member: p [BLOCK_M, BLOCK_R] fp32, E [RANK, N_COLS]."""
    e_mask = (offs_r[:, None] < RANK) & (offs_n[None, :] < N_COLS)
    e = tl.load(e_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_ec, mask=e_mask, other=0.0)
    return tl.dot((p * scaling).to(e.dtype), e, acc, input_precision=DOT_PRECISION)


@triton.jit
def _store_rows(ptr, value, offs_m, offs_c, M, COLS, stride_m, stride_c):
    """Store ``value`` [BLOCK_M, BLOCK_C] at rows offs_m, columns offs_c of a [M, COLS] matrix."""
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < COLS)
    tl.store(ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"BLOCK_M": fused_matmul_block_rows})
@triton.autotune(configs=fused_matmul_configs(), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_fused_matmul_configs})
@triton.jit
def _fused_lowrank_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, e_ptr, y_ptr, p_ptr,
    M, N_COLS, K_DIM, RANK, scaling,
    stride_xn, stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_sn, stride_sk, stride_sr,
    stride_en, stride_er, stride_ec,
    stride_yn, stride_ym, stride_yc,
    stride_pn, stride_pm, stride_pr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    member = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_COLS, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around (their results are never stored); the rank
    # columns past RANK are masked to zero so that they add nothing to the update.
    rows = offs_m % M
    cols = offs_n % N_COLS
    r_mask = offs_r < RANK

    x_ptrs = x_ptr + member * stride_xn + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    s_ptrs = s_ptr + member * stride_sn + offs_k[:, None] * stride_sk + offs_r[None, :] * stride_sr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = offs_k < K_DIM - k0
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        s = tl.load(s_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        p = tl.dot(x, s, p, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += BLOCK_K * stride_sk

    if pid_n == 0:
        _store_rows(p_ptr + member * stride_pn, p, offs_m, offs_r, M, RANK, stride_pm, stride_pr)
    acc = _lowrank_update(acc, p, e_ptr + member * stride_en, offs_r, offs_n, RANK, N_COLS, scaling,
                          stride_er, stride_ec, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    _store_rows(y_ptr + member * stride_yn, acc, offs_m, offs_n, M, N_COLS, stride_ym, stride_yc)


@triton.heuristics({"BLOCK_M": fused_matmul_block_rows})
@triton.autotune(configs=shared_rows_configs(), key=_TUNING_KEY + ["NUM_MEMBERS", "SUM_MEMBERS"],
                 prune_configs_by={"early_config_prune": prune_fused_matmul_configs})
@triton.jit
def _fused_lowrank_matmul_shared_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, e_ptr, y_ptr, p_ptr,
    M, N_COLS, K_DIM, RANK, NUM_MEMBERS, scaling,
    stride_xn, stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_sn, stride_sk, stride_sr,
    stride_en, stride_er, stride_ec,
    stride_yn, stride_ym, stride_yc,
    stride_pn, stride_pm, stride_pr,
    SUM_MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_COLS, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M
    cols = offs_n % N_COLS
    r_mask = offs_r < RANK
    x_tile = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk

    # The base tile, once: X W, or (sum_n X[n]) W.
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = offs_k < K_DIM - k0
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if SUM_MEMBERS:
            x_sum = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            x_n = x_tile + k0 * stride_xk
            for _ in range(NUM_MEMBERS):
                x_sum += tl.load(x_n, mask=k_mask[None, :], other=0.0).to(tl.float32)
                x_n += stride_xn
            x = x_sum.to(w.dtype)
        else:
            x = tl.load(x_tile + k0 * stride_xk, mask=k_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    # The low-rank update of each member of this program's group on top of it (grid axis 1 splits
    # the members into groups; one group when SUM_MEMBERS). The member pointers advance by one
    # member stride per iteration (pointer arithmetic, so no 32-bit offset overflow).
    members_per_group = tl.cdiv(NUM_MEMBERS, tl.num_programs(1))
    first_member = tl.program_id(1) * members_per_group
    last_member = min(first_member + members_per_group, NUM_MEMBERS)
    first = first_member.to(tl.int64)
    x_member = x_tile + first * stride_xn
    s_member = s_ptr + first * stride_sn + offs_k[:, None] * stride_sk + offs_r[None, :] * stride_sr
    e_member = e_ptr + first * stride_en
    p_member = p_ptr + first * stride_pn
    y_member = y_ptr + first * stride_yn
    for _ in range(first_member, last_member):
        x_ptrs = x_member
        s_ptrs = s_member
        p = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            k_mask = offs_k < K_DIM - k0
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            s = tl.load(s_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            p = tl.dot(x, s, p, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            s_ptrs += BLOCK_K * stride_sk
        if pid_n == 0:
            _store_rows(p_member, p, offs_m, offs_r, M, RANK, stride_pm, stride_pr)
        if SUM_MEMBERS:
            acc = _lowrank_update(acc, p, e_member, offs_r, offs_n, RANK, N_COLS, scaling, stride_er, stride_ec,
                                  DOT_PRECISION)
        else:
            y = _lowrank_update(acc, p, e_member, offs_r, offs_n, RANK, N_COLS, scaling, stride_er, stride_ec,
                                  DOT_PRECISION)
            _store_rows(y_member, y, offs_m, offs_n, M, N_COLS, stride_ym, stride_yc)
        x_member += stride_xn
        s_member += stride_sn
        e_member += stride_en
        p_member += stride_pn
        y_member += stride_yn
    if SUM_MEMBERS:
        _store_rows(y_ptr, acc, offs_m, offs_n, M, N_COLS, stride_ym, stride_yc)


def member_groups_for(rows: int, n_cols: int, num_members: int, device: torch.device) -> int:
    """Member groups of the shared-rows forward: 1 (one base GEMM) while the output tiles fill
    the GPU; for small batches (fewer 64 x 128 tiles than SMs) enough groups to occupy every SM,
    trading a recomputed base tile for parallelism."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(rows, 64) * triton.cdiv(n_cols, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_members, sms // tiles))


def fused_lowrank_matmul(
    x: Tensor,
    w: Tensor,
    s: Tensor,
    e: Tensor,
    bias: Tensor | None,
    scaling: float,
    sum_members: bool = False,
    member_groups: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``Y[n] = X[n] @ W + bias + scaling * (X[n] @ S[n]) @ E[n]`` for every member, one launch.

    Every tensor may have any strides (pass transposed views rather than copies).

    Args:
        x: ``[N, M, K]`` per-member rows, or ``[M, K]`` rows shared by every member.
        w: ``[K, C]``, shared.
        s: ``[N, K, R]``.
        e: ``[N, R, C]``.
        bias: ``[C]`` or None (made contiguous).
        scaling: the factor of the low-rank update.
        sum_members: with ``x [N, M, K]``, return ``Y = sum_n Y[n]`` (bias excluded) as ``[M, C]``,
            computing ``(sum_n X[n]) @ W`` once.
        member_groups: with shared rows ``x [M, K]``, how many groups of members get their own
            programs, each computing ``X @ W`` once for its group; None picks it from the shapes and
            the GPU (:func:`member_groups_for`). Always 1 with ``sum_members``.

    Returns:
        ``(y, p)``: ``y [N, M, C]`` (``[M, C]`` with ``sum_members``) in x's dtype, and
        ``p = X @ S [N, M, R]`` in float32.
    """
    num_members, k_dim, rank = s.shape
    n_cols = w.shape[1]
    shared_rows = x.dim() == 2
    rows = x.shape[-2]
    if sum_members and (shared_rows or bias is not None):
        raise ValueError("sum_members needs per-member rows x [N, M, K] and no bias")
    y_shape = (rows, n_cols) if sum_members else (num_members, rows, n_cols)
    y = torch.empty(y_shape, device=x.device, dtype=x.dtype)
    p = torch.empty((num_members, rows, rank), device=x.device, dtype=torch.float32)
    if rows == 0:
        return y.zero_(), p
    bias = bias.contiguous() if bias is not None else None
    x3 = x.unsqueeze(0) if shared_rows else x  # member stride 0 when shared
    stride_xn = 0 if shared_rows else x3.stride(0)
    y3 = y.unsqueeze(0) if sum_members else y
    args = (
        x3, w, bias, s, e, y3, p,
        rows, n_cols, k_dim, rank,
    )
    strides = (
        stride_xn, x3.stride(1), x3.stride(2),
        w.stride(0), w.stride(1),
        s.stride(0), s.stride(1), s.stride(2),
        e.stride(0), e.stride(1), e.stride(2),
        0 if sum_members else y3.stride(0), y3.stride(1), y3.stride(2),
        p.stride(0), p.stride(1), p.stride(2),
    )
    meta = {"HAS_BIAS": bias is not None, "DOT_PRECISION": dot_precision(x.dtype), "BLOCK_R": block_rank(rank)}
    if shared_rows or sum_members:
        if sum_members:
            member_groups = 1
        elif member_groups is None:
            member_groups = member_groups_for(rows, n_cols, num_members, x.device)
        member_groups = max(1, min(member_groups, num_members))

        def grid(cfg):
            return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(n_cols, cfg["BLOCK_N"]), member_groups)

        _fused_lowrank_matmul_shared_kernel[grid](*args, num_members, float(scaling), *strides,
                                                  SUM_MEMBERS=sum_members, **meta)
    else:
        def grid(cfg):
            return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(n_cols, cfg["BLOCK_N"]), num_members)

        _fused_lowrank_matmul_kernel[grid](*args, float(scaling), *strides, **meta)
    return y, p
