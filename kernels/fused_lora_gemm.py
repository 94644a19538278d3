# Fused GEMM + LoRA: the base GEMM and every member's low-rank update in one launch, in the two
# roles of csrc/cuda/fused_lora_gemm.cuh (the same words for the same roles, see csrc/cuda/params.cuh):
#
#     low[n] = in[n] @ shrink[n]                                   [M, R]  fp32, stored
#     out[n] = in[n] @ weight + bias + scaling * low[n] @ expand[n]  [M, C]  one rounding at the store
#
# with in [N, M, K], weight [K, C] shared, shrink [N, K, R], expand [N, R, C] (any strides):
#     forward      in = x,  weight = W0^T, shrink = A^T, expand = B^T, low = xa   (K = d, C = k)
#     backward dx  in = dy, weight = W0,   shrink = B,   expand = A,   low = dyb  (K = k, C = d)
#
# Stacked kernel: the N*M stacked rows are ONE [N*M, K] matrix to the base GEMM (W0 is read once per
# row tile of the whole stacked batch, not once per member). Grid cdiv(N*M, BLOCK_M) * cdiv(C,
# BLOCK_N * COL_TILES) programs in grouped (GROUP_M, tl.swizzle2d) order; a row tile may hold rows of several
# consecutive members (rows are member-major), each row's member is row // M. The rank part is
# segmented per row (Punica's SGMV / S-LoRA's MBGMV, with the base GEMM fused in), block-masked:
# the shrink factors of the RANK_SLOTS members a pass holds are loaded side by side as one
# [BLOCK_K, RANK_SLOTS * BLOCK_R] operand, so the K-loop that feeds the in tile to the base dot
# (in @ weight into a [BLOCK_M, BLOCK_N] fp32 accumulator) feeds it to ONE more dot, giving every
# row's product with every slot's member; the entries whose column member is not the row's member
# are zeroed (a select), then each member's [BLOCK_R, BLOCK_N] expand tile is dotted with its slot
# and the result selected into its own rows (one [W, BLOCK_N] expand tile for all slots took the
# registers of the whole block, and a product with zeros would carry one member's NaN or Inf into
# the others' rows: 0 * NaN is NaN). Chosen over a loop of per-member dots inside the K-loop (the
# same FLOPs, but a nested loop of data-dependent length that Triton's software pipeliner cannot
# pipeline around the base dot): one K-loop, and the rank FLOPs it wastes on other members' columns
# are free where the tile is memory-bound (decode: 16 members x 1 row in one 16-row tile, two
# passes of a [16, 128] rank block at rank 16). The block is bounded (launch_policy.RANK_BLOCK_*:
# at most 4096 elements and 128 columns, else the [BLOCK_K, W] shrink tile spills); members beyond
# RANK_SLOTS run further passes, each its own K-loop over the rows of its members (masked loads: no
# traffic for the others) - MULTI_PASS, compiled only where some tile needs it; where tiles are at
# least a member long a tile straddles at most two members, held in one pass of 2 slots where the
# block has room (else RANK_SLOTS = 1 and the second member's pass). MEMBER_TILES
# (launch_policy.uses_member_tiles: tiles at least a member long whose padding adds at most 1/8 of
# the rows, and always where BLOCK_M divides M) tiles each member's rows on their own instead,
# N * cdiv(M, BLOCK_M) tiles (the last of each member's padded): no tile straddles, one pass, the
# further pass's registers never needed. COLUMN GROUPS (COL_TILES > 1, a config's choice; only for
# tilings of one rank pass): a program owns COL_TILES consecutive column tiles; the first runs the
# K-loop above, the others the base K-loop alone (no shrink loads, no rank dots) and reuse the rank
# block's own columns, kept in registers, for their expands. The rank work and the shrink's reads
# fall by COL_TILES, the grid by as much. A group costs registers: the spill record excludes the
# groups that spill (about half the gate's on sm_80, a quarter of the 16-bit ones on sm_90).
#
# Traffic per call (elements; T = cdiv(N*M, BLOCK_M) row tiles, N * cdiv(M, BLOCK_M) with MEMBER_TILES,
# P = cdiv(C, BLOCK_N) column tiles in G = P / COL_TILES groups, S_t the members tile t spans,
# sum_t S_t <= N + T - 1; tests/test_kernel_traffic.py holds it):
#     weight  T * K * C (once per row tile)      in      P * N*M * K (+ padded rows, + rows of further passes)
#     shrink  G * sum_t S_t * K * R              expand  sum_t S_t * R * C (about once)
# (rows and columns past the edge wrap around instead of being masked in the K-loop: the last row
# and column tiles load min(BLOCK_M, N*M) rows and min(BLOCK_N, C) columns; benchmarks/kernel_traffic
# counts them exactly).
# x A^T is recomputed in every column group (no program waits for another): shrink is re-read G
# times, from L2 (it is N*R*K elements, R/C of W0 per member).
#
# Split-K (the stacked kernel with a weight, where its output tiles leave SMs idle: decode, small
# batches; launch_policy.with_k_splits, the CUDA kernels' policy; offered beside the unsplit tiling on
# candidates of its own, configs.FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS; the config model chooses in
# fused_tiling): _fused_lora_gemm_split_k_kernel, grid
# axis 1 = S ranges of K_PER_SPLIT (whole K steps). Each program runs its tile's K-loops over its range
# and every rank pass's update from its range's rank block (the update is linear in it), and stores
# the fp32 result and (first column tile) the rank blocks to a workspace; the program of a tile that
# arrives last (an atomic count per tile) adds the S ranges up in range order (deterministic, whatever
# order they finish in) and stores out with the bias, and low. Traffic as above, each range reading its
# part of weight, in and shrink; the expand once per range; and S * N*M * (C + R) fp32 of workspace
# written and read back (from L2). At decode (one 16-row tile, 32 column tiles of 128 on 132 SMs): 4
# ranges, 128 programs instead of 32.
#
# Shared-input kernel (in [M, K] read by every member; grid cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N)):
# each program computes its base tile ONCE for all members, and small batches fill the GPU with
# 16-row tiles (launch_policy.shared_block_rows) rather than member groups that would each
# recompute it.
#   forward (SUM_MEMBERS=False): the first RANK_SLOTS members' x A^T come from the base K-loop as
#     one block-masked operand as above (every row needs every member, so nothing is zeroed), the
#     rest in further passes; each member's slice of the block is then taken out (a reshape and a
#     masked sum), its update added to a copy of the base tile and stored to out[n].
#   dx (SUM_MEMBERS=True): out [M, C] = (sum_n in[n]) @ weight + scaling * sum_n low[n] @ expand[n],
#     the member sum of the in tiles taken in fp32 inside the K-loop (_member_sum_k_loop), then one
#     K-loop per member for its own in[n] @ shrink[n].
#
# Precision: every accumulator is fp32. fp32 inputs run every dot with DOT_PRECISION ("tf32" when
# PyTorch allows TF32 matmuls, else "tf32x3": configs.dot_precision). A 16-bit operand made from an
# fp32 value (scaling * low, the member sum of dy) is split into a high and a low 16-bit part and
# run as two tensor-core dots, which keeps ~16 mantissa bits (near fp32, as the CUDA kernels do);
# in fp16 its rows are first divided by a power of two where they would overflow (65504) and the
# accumulator with them, undone exactly after the dots.
"""Fused base GEMM + per-member low-rank update (forward and dx backward of a LoRA ensemble)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from lora_ensemble.tuning_store import split_k_allowed, tuning_pinned

from .config_model import GemmLaunch, cheapest_tiling
from .configs import (
    DTYPE_NAMES,
    FusedProblem,
    argument_specialisation,
    column_group,
    dot_precision,
    fused_lora_gemm_configs,
    shared_input_configs,
    size_bucket,
    unspilled_tilings,
)
from .device import launch_device, multiprocessor_count
from .dot import dot_fp32_lhs, split16
from .gpu_specs import GpuSpec, gpu_spec
from .launch_costs import shared_launch, split_k_partial_floats, stacked_launch
from .launch_policy import (
    RowTiling,
    block_rank,
    shared_tilings,
    stacked_k_per_split,
    stacked_row_tiles,
    stacked_tilings,
    with_k_splits,
)
from .launcher import MAX_BOUND_KEYS, LaunchPlan, TunedKernel

__all__ = ["fused_tiling", "launch_fused_lora_gemm"]

# Not specialised, so their values never cause a recompile: the row, member and rank counts (only
# compared and divided by in the kernels; Triton would compile another kernel for a value of 1,
# e.g. at decode, and for 16-divisible ones).
_UNSPECIALISED = ["ROWS", "MEMBERS", "RANK"]
# Stacked rows and output tiles are counted in int32 inside the kernels.
_MAX_ROWS = 2**31 - 1


@triton.jit
def _k_loop(in_ptrs, weight_ptrs, shrink_ptrs, acc, low, INNER, stride_in_k, stride_weight_k, stride_shrink_k,
            offs_k, row_mask, slot_mask, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, WITH_BASE: tl.constexpr,
            WITH_LOW: tl.constexpr, ROWS_MASKED: tl.constexpr):
    """One pass over the reduction: ``acc += in @ weight`` (WITH_BASE) and ``low += in @ shrink``
    (WITH_LOW), both fed by the same ``in`` tile, whose rows are loaded only where ``row_mask``
    (ROWS_MASKED; else all). The pointers address the first K step: ``in_ptrs`` [BLOCK_M, BLOCK_K],
    ``weight_ptrs`` [BLOCK_K, BLOCK_N], ``shrink_ptrs`` [BLOCK_K, W] (``slot_mask`` [W]: its
    columns that exist)."""
    for k0 in range(0, INNER, BLOCK_K):
        k_mask = offs_k < INNER - k0
        if ROWS_MASKED:
            tile = tl.load(in_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        else:
            tile = tl.load(in_ptrs, mask=k_mask[None, :], other=0.0)
        if WITH_BASE:
            w = tl.load(weight_ptrs, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(tile, w, acc, input_precision=DOT_PRECISION)
        if WITH_LOW:
            s = tl.load(shrink_ptrs, mask=k_mask[:, None] & slot_mask[None, :], other=0.0)
            low = tl.dot(tile, s, low, input_precision=DOT_PRECISION)
        in_ptrs += BLOCK_K * stride_in_k
        weight_ptrs += BLOCK_K * stride_weight_k
        shrink_ptrs += BLOCK_K * stride_shrink_k
    return acc, low


@triton.jit
def _member_sum_k_loop(in_ptrs, weight_ptrs, acc, INNER, MEMBERS, member_sum_scale, stride_in_n, stride_in_k,
                       stride_weight_k, offs_k, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """``acc += (member_sum_scale * sum_n in[n]) @ weight``: the member sum of each ``in`` tile in
    fp32, scaled by ``member_sum_scale`` = 2^-ceil(log2 N) (exact), which keeps it within the range
    of a 16-bit dtype, then for 16-bit inputs split into high and low parts (two dots)."""
    for k0 in range(0, INNER, BLOCK_K):
        k_mask = offs_k < INNER - k0
        w = tl.load(weight_ptrs, mask=k_mask[:, None], other=0.0)
        total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        member_ptrs = in_ptrs + k0 * stride_in_k
        for _ in range(MEMBERS):
            total += tl.load(member_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32)
            member_ptrs += stride_in_n
        total = total * member_sum_scale
        if w.dtype == tl.float32:
            acc = tl.dot(total, w, acc, input_precision=DOT_PRECISION)
        else:  # in range of the 16-bit dtype: no row scaling needed
            hi, lo = split16(total, w.dtype)
            acc = tl.dot(lo, w, tl.dot(hi, w, acc))
        weight_ptrs += BLOCK_K * stride_weight_k
    return acc


@triton.jit
def _slots(first_member, last_member, RANK, BLOCK_R: tl.constexpr, RANK_SLOTS: tl.constexpr):
    """The columns of a pass's rank block [.., RANK_SLOTS * BLOCK_R]: each one's member (from
    ``first_member`` on), rank index, and whether it exists (rank < RANK, member <= last_member)."""
    offs_w = tl.arange(0, RANK_SLOTS * BLOCK_R)
    member = first_member + (offs_w // BLOCK_R).to(tl.int64)
    rank = offs_w % BLOCK_R
    return member, rank, (rank < RANK) & (member <= last_member)


@triton.jit
def _rank_pass_k_loop(in_ptrs, weight_ptrs, shrink_ptr, acc, first_member, last_member, INNER, RANK, stride_in_k,
                      stride_weight_k, stride_shrink_n, stride_shrink_k, stride_shrink_r, offs_k, row_mask,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, RANK_SLOTS: tl.constexpr, WITH_BASE: tl.constexpr,
                      ROWS_MASKED: tl.constexpr):
    """The K-loop of one rank pass over members ``first_member`` .. (at most RANK_SLOTS, none past
    ``last_member``), with the base dot into ``acc`` (WITH_BASE). Returns ``acc``, the rank block
    ``in @ [shrink of each slot]`` [BLOCK_M, RANK_SLOTS * BLOCK_R] and the slots (:func:`_slots`)."""
    slot_member, slot_rank, slot_mask = _slots(first_member, last_member, RANK, BLOCK_R, RANK_SLOTS)
    shrink_ptrs = (shrink_ptr + slot_member[None, :] * stride_shrink_n + offs_k[:, None] * stride_shrink_k
                   + slot_rank[None, :] * stride_shrink_r)
    acc, low = _k_loop(in_ptrs, weight_ptrs, shrink_ptrs, acc,
                       tl.zeros((BLOCK_M, RANK_SLOTS * BLOCK_R), dtype=tl.float32), INNER, stride_in_k,
                       stride_weight_k, stride_shrink_k, offs_k, row_mask, slot_mask, DOT_PRECISION, BLOCK_K,
                       WITH_BASE=WITH_BASE, WITH_LOW=True, ROWS_MASKED=ROWS_MASKED)
    return acc, low, slot_member, slot_rank, slot_mask


@triton.jit
def _slot_of(low_slots, slot, RANK_SLOTS: tl.constexpr):
    """Slot ``slot``'s columns [BLOCK_M, BLOCK_R] of a rank block viewed as [BLOCK_M, RANK_SLOTS,
    BLOCK_R] (a select and a sum: register tensors have no slices)."""
    if RANK_SLOTS == 1:
        return tl.sum(low_slots, axis=1)
    return tl.sum(tl.where(tl.arange(0, RANK_SLOTS)[None, :, None] == slot, low_slots, 0.0), axis=1)


@triton.jit
def _own_columns(low, row_member, row_low, rows_valid, slot_member, slot_rank, slot_mask, store_low, low_ptr,
                 stride_low_n, stride_low_r):
    """Keep each row's own member's columns of the rank block ``low`` [BLOCK_M, W] (the others
    zeroed) and store them to ``low`` (``store_low``: the programs of the first column tile;
    ``row_low`` is each row's offset within its member)."""
    own = row_member[:, None] == slot_member[None, :]
    low = tl.where(own, low, 0.0)
    if store_low:
        tl.store(low_ptr + row_member[:, None] * stride_low_n + row_low[:, None] + slot_rank[None, :] * stride_low_r,
                 low, mask=own & slot_mask[None, :] & rows_valid[:, None])
    return low


@triton.jit
def _add_expands(acc, low, first_member, last_member, row_member, expand_ptr, offs_c, COLS, RANK, scaling,
                 stride_expand_n, stride_expand_r, stride_expand_c, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, RANK_SLOTS: tl.constexpr):
    """Add ``scaling * low[n] @ expand[n]`` to the rows of each member n of a pass (``low``: the own
    columns of its rank block, :func:`_own_columns`), one member at a time: a [BLOCK_R, BLOCK_N]
    expand tile each (one [W, BLOCK_N] tile would take the registers of the whole block), and a
    select, not a product with zeros, keeps each member's update (and a NaN or Inf in its factors,
    0 * NaN being NaN) out of the other members' rows."""
    low_slots = tl.reshape(low, (BLOCK_M, RANK_SLOTS, BLOCK_R))
    offs_r = tl.arange(0, BLOCK_R)
    for slot in range(0, tl.minimum(RANK_SLOTS, last_member - first_member + 1)):
        member = first_member + slot
        update = _add_expand(acc, _slot_of(low_slots, slot, RANK_SLOTS), expand_ptr + member * stride_expand_n,
                             offs_r, offs_c, RANK, COLS, scaling, stride_expand_r, stride_expand_c, DOT_PRECISION)
        acc = tl.where((row_member == member)[:, None], update, acc)
    return acc


@triton.jit
def _add_own_update(acc, low, first_member, last_member, row_member, row_low, rows_valid, slot_member, slot_rank,
                    slot_mask, store_low, low_ptr, stride_low_n, stride_low_r, expand_ptr, offs_c, COLS, RANK,
                    scaling, stride_expand_n, stride_expand_r, stride_expand_c, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, RANK_SLOTS: tl.constexpr):
    """The end of a stacked rank pass over members ``first_member`` .. ``last_member``: its own
    columns (:func:`_own_columns`), then their updates (:func:`_add_expands`). Returns ``acc`` and
    the own columns (kept for the program's further column tiles)."""
    low = _own_columns(low, row_member, row_low, rows_valid, slot_member, slot_rank, slot_mask, store_low, low_ptr,
                       stride_low_n, stride_low_r)
    acc = _add_expands(acc, low, first_member, last_member, row_member, expand_ptr, offs_c, COLS, RANK, scaling,
                       stride_expand_n, stride_expand_r, stride_expand_c, DOT_PRECISION, BLOCK_M, BLOCK_R, RANK_SLOTS)
    return acc, low


@triton.jit
def _add_expand(acc, low, expand_ptr, offs_r, offs_c, RANK, COLS, scaling, stride_expand_r, stride_expand_c,
                DOT_PRECISION: tl.constexpr):
    """``acc + scaling * low @ expand`` for one member: ``low`` [BLOCK_M, BLOCK_R] fp32, ``expand``
    [RANK, COLS] (rank rows past RANK masked to zero)."""
    mask = (offs_r[:, None] < RANK) & (offs_c[None, :] < COLS)
    expand = tl.load(expand_ptr + offs_r[:, None] * stride_expand_r + offs_c[None, :] * stride_expand_c,
                     mask=mask, other=0.0)
    return dot_fp32_lhs(low * scaling, expand, acc, DOT_PRECISION)


@triton.jit
def _tile_of(pid, ROWS, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column tile of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns
    together, so a column strip of ``weight`` stays in L2 while they use it."""
    num_pid_n = tl.cdiv(COLS, BLOCK_N)
    return tl.swizzle2d(pid // num_pid_n, pid % num_pid_n, tl.cdiv(ROWS, BLOCK_M), num_pid_n, GROUP_M)


@triton.jit
def _store_tile(ptr, value, row_offsets, rows_valid, offs_c, COLS, stride_c):
    """Store ``value`` [BLOCK_M, BLOCK_C] at element offsets ``row_offsets`` (rows) and columns
    ``offs_c``, where the row is valid and the column < COLS."""
    mask = rows_valid[:, None] & (offs_c[None, :] < COLS)
    tl.store(ptr + row_offsets[:, None] + offs_c[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_output(out_ptr, acc, bias_ptr, base_ptr, row_member, row_in_member, rows_valid, offs_c, cols, COLS,
                  stride_base_n, stride_base_m, stride_base_c, stride_out_n, stride_out_m, stride_out_c,
                  HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr):
    """Add the bias and the base output (where given) to a stacked output tile ``acc`` and store it
    (``cols``: ``offs_c`` wrapped at ``COLS``)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + row_member[:, None] * stride_base_n + row_in_member[:, None] * stride_base_m
                       + cols[None, :] * stride_base_c).to(tl.float32)
    _store_tile(out_ptr, acc, row_member * stride_out_n + row_in_member * stride_out_m, rows_valid, offs_c, COLS,
                stride_out_c)


@triton.jit
def _stacked_tile(ROWS, MEMBERS, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, MEMBER_TILES: tl.constexpr, COL_TILES: tl.constexpr):
    """This program's tile of the stacked kernels (axis 0): its first and last member, each row's member,
    offset within the member and validity, the column tile's offsets and (wrapped) columns, the K
    offsets and the column tile's index ``pid_n``."""
    # offs_c, offs_k and cols are spelled in both branches on purpose: the else branch is, op for op, the
    # kernel before member tiles, so it compiles to the same PTX and the spill record stays valid for it.
    if MEMBER_TILES:  # cdiv(M, BLOCK_M) row tiles a member, each inside its member (RANK_SLOTS = 1)
        member_tiles = tl.cdiv(ROWS, BLOCK_M)
        pid_m, pid_n = _tile_of(tl.program_id(0), MEMBERS * member_tiles * BLOCK_M, COLS, BLOCK_M,
                                BLOCK_N * COL_TILES, GROUP_M)
        first_member = (pid_m // member_tiles).to(tl.int64)
        last_member = first_member
        offs_m = (pid_m % member_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_n.to(tl.int64) * (BLOCK_N * COL_TILES) + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows past the member's last and columns past the edge wrap around (never stored).
        rows_valid = offs_m < ROWS
        row_member = tl.full((BLOCK_M,), 0, tl.int64) + first_member
        row_in_member = offs_m % ROWS
        cols = offs_c % COLS
    else:  # row tiles over the stacked rows
        stacked_rows = MEMBERS * ROWS
        pid_m, pid_n = _tile_of(tl.program_id(0), stacked_rows, COLS, BLOCK_M, BLOCK_N * COL_TILES, GROUP_M)
        tile_start = pid_m.to(tl.int64) * BLOCK_M
        offs_g = tile_start + tl.arange(0, BLOCK_M)
        offs_c = pid_n.to(tl.int64) * (BLOCK_N * COL_TILES) + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows and columns past the edge wrap around (their results are never stored). Each stacked
        # row g is row g % M of member g // M.
        rows_valid = offs_g < stacked_rows
        g = offs_g % stacked_rows
        row_member = g // ROWS
        row_in_member = g % ROWS
        cols = offs_c % COLS
        first_member = tile_start // ROWS
        last_member = (tl.minimum(tile_start + BLOCK_M, stacked_rows) - 1) // ROWS
    return first_member, last_member, rows_valid, row_member, row_in_member, offs_c, cols, offs_k, pid_n


@triton.jit
def _stacked_passes(in_tile, weight_tile, shrink_ptr, expand_ptr, low_ptr, first_member, last_member, rows_valid,
                    row_member, row_in_member, offs_c, offs_k, store_low, INNER, COLS, RANK, scaling, stride_in_k,
                    stride_weight_k, stride_shrink_n, stride_shrink_k, stride_shrink_r, stride_expand_n,
                    stride_expand_r, stride_expand_c, stride_low_n, stride_low_m, stride_low_r,
                    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RANK_SLOTS: tl.constexpr,
                    MULTI_PASS: tl.constexpr):
    """A stacked tile's K-loops over ``INNER`` (from ``in_tile``, ``weight_tile`` and ``shrink_ptr``
    on) and every rank pass's update: ``in @ weight + scaling * low @ expand`` [BLOCK_M, BLOCK_N] fp32,
    with ``low`` stored where ``store_low``. Returns it with the first pass's own columns and slot mask
    (kept for the program's further column tiles)."""
    # Pass 0: the base tile and the rank block of the tile's first RANK_SLOTS members, one K-loop.
    acc, low, slot_member, slot_rank, slot_mask = _rank_pass_k_loop(
        in_tile, weight_tile, shrink_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), first_member, last_member,
        INNER, RANK, stride_in_k, stride_weight_k, stride_shrink_n, stride_shrink_k, stride_shrink_r, offs_k,
        rows_valid, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, RANK_SLOTS, WITH_BASE=HAS_WEIGHT, ROWS_MASKED=False)
    row_low = row_in_member * stride_low_m
    acc, own_low = _add_own_update(acc, low, first_member, last_member, row_member, row_low, rows_valid,
                                   slot_member, slot_rank, slot_mask, store_low, low_ptr, stride_low_n, stride_low_r,
                                   expand_ptr, offs_c, COLS, RANK, scaling, stride_expand_n, stride_expand_r,
                                   stride_expand_c, DOT_PRECISION, BLOCK_M, BLOCK_R, RANK_SLOTS)
    if MULTI_PASS:  # the tile's members beyond the first RANK_SLOTS, RANK_SLOTS at a time
        for pass_first in range(first_member + RANK_SLOTS, last_member + 1, RANK_SLOTS):
            pass_rows = rows_valid & (row_member >= pass_first) & (row_member < pass_first + RANK_SLOTS)
            _, low, slot_member, slot_rank, slot_mask = _rank_pass_k_loop(
                in_tile, weight_tile, shrink_ptr, acc, pass_first, last_member, INNER, RANK, stride_in_k,
                stride_weight_k, stride_shrink_n, stride_shrink_k, stride_shrink_r, offs_k, pass_rows, DOT_PRECISION,
                BLOCK_M, BLOCK_K, BLOCK_R, RANK_SLOTS, WITH_BASE=False, ROWS_MASKED=True)
            acc, _ = _add_own_update(acc, low, pass_first, last_member, row_member, row_low, rows_valid, slot_member,
                                     slot_rank, slot_mask, store_low, low_ptr, stride_low_n, stride_low_r, expand_ptr,
                                     offs_c, COLS, RANK, scaling, stride_expand_n, stride_expand_r, stride_expand_c,
                                     DOT_PRECISION, BLOCK_M, BLOCK_R, RANK_SLOTS)
    return acc, own_low, slot_mask


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _fused_lora_gemm_kernel(
    in_ptr, weight_ptr, bias_ptr, base_ptr, shrink_ptr, expand_ptr, out_ptr, low_ptr,
    ROWS, MEMBERS, INNER, COLS, RANK,
    stride_in_n, stride_in_m, stride_in_k,
    stride_weight_k, stride_weight_c,
    stride_base_n, stride_base_m, stride_base_c,
    stride_shrink_n, stride_shrink_k, stride_shrink_r,
    stride_expand_n, stride_expand_r, stride_expand_c,
    stride_out_n, stride_out_m, stride_out_c,
    stride_low_n, stride_low_m, stride_low_r,
    scaling,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, RANK_SLOTS: tl.constexpr, MULTI_PASS: tl.constexpr,
    MEMBER_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COL_TILES: tl.constexpr,
):
    # A program owns COL_TILES consecutive column tiles (their group is one column tile of the swizzle);
    # at COL_TILES = 1 the code is, op for op, the kernel before column groups (the same PTX).
    tl.static_assert(COL_TILES == 1 or not MULTI_PASS, "a column group keeps one rank pass's block")
    first_member, last_member, rows_valid, row_member, row_in_member, offs_c, cols, offs_k, pid_n = _stacked_tile(
        ROWS, MEMBERS, COLS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, MEMBER_TILES, COL_TILES)
    store_low = pid_n == 0
    in_tile = (in_ptr + row_member[:, None] * stride_in_n + row_in_member[:, None] * stride_in_m
               + offs_k[None, :] * stride_in_k)
    weight_tile = weight_ptr + offs_k[:, None] * stride_weight_k + cols[None, :] * stride_weight_c
    acc, own_low, slot_mask = _stacked_passes(
        in_tile, weight_tile, shrink_ptr, expand_ptr, low_ptr, first_member, last_member, rows_valid, row_member,
        row_in_member, offs_c, offs_k, store_low, INNER, COLS, RANK, scaling, stride_in_k, stride_weight_k,
        stride_shrink_n, stride_shrink_k, stride_shrink_r, stride_expand_n, stride_expand_r, stride_expand_c,
        stride_low_n, stride_low_m, stride_low_r, HAS_WEIGHT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
        RANK_SLOTS, MULTI_PASS)
    _store_output(out_ptr, acc, bias_ptr, base_ptr, row_member, row_in_member, rows_valid, offs_c, cols, COLS,
                  stride_base_n, stride_base_m, stride_base_c, stride_out_n, stride_out_m, stride_out_c, HAS_BIAS,
                  HAS_BASE)
    # The group's further column tiles: the base K-loop alone, the rank block's own columns kept.
    for _ in tl.static_range(1, COL_TILES):
        offs_c += BLOCK_N
        cols = offs_c % COLS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_WEIGHT:
            acc, _ = _k_loop(in_tile, weight_ptr + offs_k[:, None] * stride_weight_k + cols[None, :] * stride_weight_c,
                             shrink_ptr, acc, own_low, INNER, stride_in_k, stride_weight_k, stride_shrink_k, offs_k,
                             rows_valid, slot_mask, DOT_PRECISION, BLOCK_K, WITH_BASE=True, WITH_LOW=False,
                             ROWS_MASKED=False)
        acc = _add_expands(acc, own_low, first_member, last_member, row_member, expand_ptr, offs_c, COLS, RANK,
                           scaling, stride_expand_n, stride_expand_r, stride_expand_c, DOT_PRECISION, BLOCK_M, BLOCK_R,
                           RANK_SLOTS)
        _store_output(out_ptr, acc, bias_ptr, base_ptr, row_member, row_in_member, rows_valid, offs_c, cols, COLS,
                      stride_base_n, stride_base_m, stride_base_c, stride_out_n, stride_out_m, stride_out_c, HAS_BIAS,
                      HAS_BASE)


@triton.jit(noinline=True)
def _add_up_ranges(partial_ptr, bias_ptr, out_ptr, low_ptr, ROWS, MEMBERS, COLS, RANK, K_SPLITS, stride_out_n,
                   stride_out_m, stride_out_c, stride_low_n, stride_low_m, stride_low_r, HAS_BIAS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, MEMBER_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The split-K kernel's end in the program of a tile that arrives last: every range's fp32 sums
    of the tile added in range order, the bias added and the output stored; in the first column tile
    also the rank blocks, stored to ``low``. A function of its own (not inlined): its registers are
    allocated apart from the K-loops' (inlined, its tile's offsets stayed live across them)."""
    first_member, last_member, rows_valid, row_member, row_in_member, offs_c, cols, offs_k, pid_n = _stacked_tile(
        ROWS, MEMBERS, COLS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, MEMBER_TILES, 1)
    stacked_rows = MEMBERS * ROWS
    out_elements = stacked_rows.to(tl.int64) * COLS
    stacked_row = row_member * ROWS + row_in_member
    out_mask = rows_valid[:, None] & (offs_c[None, :] < COLS)
    out_at = stacked_row[:, None] * COLS + offs_c[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, K_SPLITS):  # from L2 (.cg: never a stale L1 line)
        total += tl.load(partial_ptr + s * out_elements + out_at, mask=out_mask, other=0.0, cache_modifier=".cg")
    _store_output(out_ptr, total, bias_ptr, bias_ptr, row_member, row_in_member, rows_valid, offs_c, cols, COLS,
                  0, 0, 0, stride_out_n, stride_out_m, stride_out_c, HAS_BIAS, False)
    if pid_n == 0:
        low_elements = stacked_rows.to(tl.int64) * RANK
        low_partial = partial_ptr + K_SPLITS * out_elements
        offs_r = tl.arange(0, BLOCK_R)
        low_mask = rows_valid[:, None] & (offs_r[None, :] < RANK)
        low_at = stacked_row[:, None] * RANK + offs_r[None, :]
        low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, K_SPLITS):
            low += tl.load(low_partial + s * low_elements + low_at, mask=low_mask, other=0.0, cache_modifier=".cg")
        tl.store(low_ptr + row_member[:, None] * stride_low_n + row_in_member[:, None] * stride_low_m
                 + offs_r[None, :] * stride_low_r, low, mask=low_mask)


# K_PER_SPLIT is specialised (always a multiple of 64, so 16-divisible): the ranges' first K steps are then
# known aligned, and the K-loops' loads vectorised and pipelined as in the unsplit kernel (unspecialised,
# Triton pipelined them with half the shared memory and one element per pointer).
@triton.jit(do_not_specialize=[*_UNSPECIALISED, "K_SPLITS"])
def _fused_lora_gemm_split_k_kernel(
    in_ptr, weight_ptr, bias_ptr, base_ptr, shrink_ptr, expand_ptr, out_ptr, low_ptr,
    ROWS, MEMBERS, INNER, COLS, RANK,
    stride_in_n, stride_in_m, stride_in_k,
    stride_weight_k, stride_weight_c,
    stride_base_n, stride_base_m, stride_base_c,
    stride_shrink_n, stride_shrink_k, stride_shrink_r,
    stride_expand_n, stride_expand_r, stride_expand_c,
    stride_out_n, stride_out_m, stride_out_c,
    stride_low_n, stride_low_m, stride_low_r,
    scaling,
    partial_ptr, arrivals_ptr, K_PER_SPLIT, K_SPLITS,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    RANK_SLOTS: tl.constexpr, MULTI_PASS: tl.constexpr, MEMBER_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The stacked kernel with its reduction split in K_SPLITS ranges of K_PER_SPLIT (grid axis 1; the
    # tiles as _fused_lora_gemm_kernel's, one column tile a program). Each program runs the tile's
    # K-loops over its range and every rank pass's update from its range's rank block (the update is
    # linear in it), and writes the fp32 sum and its rank blocks to `partial`: [K_SPLITS, N*M, C] sums,
    # then [K_SPLITS, N, M, RANK] rank blocks (those of the first column tile only). The program of a
    # tile that arrives last (an atomic count in arrivals [programs], zeroed by the launcher) adds the
    # ranges' sums in range order (deterministic), adds the bias and stores; the first column tile's
    # also adds up and stores low.
    first_member, last_member, rows_valid, row_member, row_in_member, offs_c, cols, offs_k, pid_n = _stacked_tile(
        ROWS, MEMBERS, COLS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, MEMBER_TILES, 1)
    split = tl.program_id(1)
    k_begin = split.to(tl.int64) * K_PER_SPLIT
    k_length = tl.minimum(INNER - split * K_PER_SPLIT, K_PER_SPLIT)  # int32: split * K_PER_SPLIT < INNER
    store_low = pid_n == 0
    stacked_rows = MEMBERS * ROWS
    out_elements = stacked_rows.to(tl.int64) * COLS
    low_elements = stacked_rows.to(tl.int64) * RANK
    low_partial = partial_ptr + K_SPLITS * out_elements  # [K_SPLITS, N, M, RANK], contiguous
    # The range's first K step: the base pointers moved, the tiles' offsets as in the unsplit kernel.
    in_tile = (in_ptr + k_begin * stride_in_k + row_member[:, None] * stride_in_n
               + row_in_member[:, None] * stride_in_m + offs_k[None, :] * stride_in_k)
    weight_tile = (weight_ptr + k_begin * stride_weight_k + offs_k[:, None] * stride_weight_k
                   + cols[None, :] * stride_weight_c)
    acc, _, _ = _stacked_passes(
        in_tile, weight_tile, shrink_ptr + k_begin * stride_shrink_k, expand_ptr, low_partial + split * low_elements,
        first_member, last_member, rows_valid, row_member, row_in_member, offs_c, offs_k, store_low,
        k_length, COLS, RANK, scaling, stride_in_k, stride_weight_k, stride_shrink_n,
        stride_shrink_k, stride_shrink_r, stride_expand_n, stride_expand_r, stride_expand_c, ROWS * RANK, RANK, 1,
        True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, RANK_SLOTS, MULTI_PASS)
    stacked_row = row_member * ROWS + row_in_member
    out_mask = rows_valid[:, None] & (offs_c[None, :] < COLS)
    out_at = stacked_row[:, None] * COLS + offs_c[None, :]
    tl.store(partial_ptr + split * out_elements + out_at, acc, mask=out_mask)
    # Every thread's stores before the count (a release at GPU scope); the last program's loads after it
    # (an acquire), from L2 (.cg: never a stale L1 line).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    if arrived == K_SPLITS - 1:
        _add_up_ranges(partial_ptr, bias_ptr, out_ptr, low_ptr, ROWS, MEMBERS, COLS, RANK, K_SPLITS, stride_out_n,
                       stride_out_m, stride_out_c, stride_low_n, stride_low_m, stride_low_r, HAS_BIAS, BLOCK_R,
                       BLOCK_M, MEMBER_TILES, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _fused_lora_gemm_shared_kernel(
    in_ptr, weight_ptr, bias_ptr, base_ptr, shrink_ptr, expand_ptr, out_ptr, low_ptr,
    ROWS, MEMBERS, INNER, COLS, RANK,
    stride_in_n, stride_in_m, stride_in_k,
    stride_weight_k, stride_weight_c,
    stride_base_n, stride_base_m, stride_base_c,
    stride_shrink_n, stride_shrink_k, stride_shrink_r,
    stride_expand_n, stride_expand_r, stride_expand_c,
    stride_out_n, stride_out_m, stride_out_c,
    stride_low_n, stride_low_m, stride_low_r,
    scaling, member_sum_scale,
    SUM_MEMBERS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, RANK_SLOTS: tl.constexpr,
    MULTI_PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), ROWS, COLS, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_valid = offs_m < ROWS
    rows = offs_m % ROWS
    cols = offs_c % COLS
    store_low = pid_n == 0
    in_tile = in_ptr + rows[:, None] * stride_in_m + offs_k[None, :] * stride_in_k
    weight_tile = weight_ptr + offs_k[:, None] * stride_weight_k + cols[None, :] * stride_weight_c
    base_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if SUM_MEMBERS:
        # out = (sum_n in[n]) @ weight + scaling * sum_n (in[n] @ shrink[n]) @ expand[n], one member at a time.
        acc = base_acc
        if HAS_WEIGHT:
            acc = _member_sum_k_loop(in_tile, weight_tile, acc, INNER, MEMBERS, member_sum_scale, stride_in_n,
                                     stride_in_k, stride_weight_k, offs_k, DOT_PRECISION, BLOCK_M, BLOCK_K)
            acc = acc * (1.0 / member_sum_scale)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < RANK
        shrink_tile = shrink_ptr + offs_k[:, None] * stride_shrink_k + offs_r[None, :] * stride_shrink_r
        # The member pointers advance by one member stride per iteration (no 32-bit offset overflow).
        in_member = in_tile
        shrink_member = shrink_tile
        expand_member = expand_ptr
        low_member = low_ptr
        for _ in range(0, MEMBERS):
            _, low = _k_loop(in_member, weight_tile, shrink_member, acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                             INNER, stride_in_k, stride_weight_k, stride_shrink_k, offs_k, rows_valid, r_mask,
                             DOT_PRECISION, BLOCK_K, WITH_BASE=False, WITH_LOW=True, ROWS_MASKED=False)
            if store_low:
                _store_tile(low_member, low, rows * stride_low_m, rows_valid, offs_r, RANK, stride_low_r)
            acc = _add_expand(acc, low, expand_member, offs_r, offs_c, RANK, COLS, scaling, stride_expand_r,
                              stride_expand_c, DOT_PRECISION)
            in_member += stride_in_n
            shrink_member += stride_shrink_n
            expand_member += stride_expand_n
            low_member += stride_low_n
        _store_tile(out_ptr, acc, rows * stride_out_m, rows_valid, offs_c, COLS, stride_out_c)
    else:
        # The base tile once, with the first RANK_SLOTS members' rank block in the same K-loop.
        base_acc, low, _, _, _ = _rank_pass_k_loop(
            in_tile, weight_tile, shrink_ptr, base_acc, 0, MEMBERS - 1, INNER, RANK, stride_in_k, stride_weight_k,
            stride_shrink_n, stride_shrink_k, stride_shrink_r, offs_k, rows_valid, DOT_PRECISION, BLOCK_M, BLOCK_K,
            BLOCK_R, RANK_SLOTS, WITH_BASE=HAS_WEIGHT, ROWS_MASKED=False)
        if HAS_BIAS:
            base_acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if HAS_BASE:
            base_acc += tl.load(base_ptr + rows[:, None] * stride_base_m + cols[None, :] * stride_base_c).to(tl.float32)
        offs_r = tl.arange(0, BLOCK_R)
        members_end = 1  # one pass unless MULTI_PASS
        if MULTI_PASS:
            members_end = MEMBERS
        for pass_first in range(0, members_end, RANK_SLOTS):
            if pass_first > 0:  # MULTI_PASS: the next RANK_SLOTS members' rank block
                _, low, _, _, _ = _rank_pass_k_loop(
                    in_tile, weight_tile, shrink_ptr, base_acc, pass_first, MEMBERS - 1, INNER, RANK, stride_in_k,
                    stride_weight_k, stride_shrink_n, stride_shrink_k, stride_shrink_r, offs_k, rows_valid,
                    DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, RANK_SLOTS, WITH_BASE=False, ROWS_MASKED=False)
            low_slots = tl.reshape(low, (BLOCK_M, RANK_SLOTS, BLOCK_R))
            for slot in range(0, tl.minimum(RANK_SLOTS, MEMBERS - pass_first)):
                n = tl.full([], 0, tl.int64) + pass_first + slot
                member_low = _slot_of(low_slots, slot, RANK_SLOTS)
                if store_low:
                    _store_tile(low_ptr + n * stride_low_n, member_low, rows * stride_low_m, rows_valid, offs_r,
                                RANK, stride_low_r)
                out = _add_expand(base_acc, member_low, expand_ptr + n * stride_expand_n, offs_r, offs_c, RANK, COLS,
                                  scaling, stride_expand_r, stride_expand_c, DOT_PRECISION)
                _store_tile(out_ptr + n * stride_out_n, out, rows * stride_out_m, rows_valid, offs_c, COLS,
                            stride_out_c)



_STACKED = TunedKernel("fused_lora_gemm", _fused_lora_gemm_kernel)
_STACKED_SPLIT_K = TunedKernel("fused_lora_gemm_split_k", _fused_lora_gemm_split_k_kernel)
_SHARED = TunedKernel("fused_lora_gemm_shared", _fused_lora_gemm_shared_kernel)


class _SplitK(NamedTuple):
    """A stacked launch key whose tiling splits K: its ranges and the workspace each call allocates
    (the kernel's ``partial`` sums and rank blocks, and ``arrivals`` counts zeroed: one per program of
    axis 0 under the narrowest candidate column tile)."""

    splits: int
    per_split: int
    partial_floats: int
    arrivals: int

    def workspace(self, device: torch.device) -> tuple:
        """The split-K kernel's arguments after the stacked kernel's: partial, arrivals, K_PER_SPLIT, K_SPLITS."""
        return (torch.empty(self.partial_floats, device=device, dtype=torch.float32),
                torch.zeros(self.arrivals, device=device, dtype=torch.int32), self.per_split, self.splits)


# Launch keys of the stacked kernel whose tiling splits K (the first call's plan decides; cleared as the
# launcher's bound keys are).
_SPLIT_K: dict[tuple, _SplitK] = {}
# Leading runtime arguments of both kernels that are pointers (in, weight, bias, base, shrink,
# expand, out, low), then integers: ROWS, MEMBERS, INNER, COLS, RANK and the strides.
_POINTERS = 8


def fused_tiling(configs: list[triton.Config], shared: bool, rows: int, members: int, inner: int, cols: int,
                 rank: int, dtype: torch.dtype, precision: str, gpu: GpuSpec, sm_count: int,
                 specialisation: str = "aligned", sum_members: bool = False, has_weight: bool = True,
                 has_base: bool = False, split_k_configs: list[triton.Config] | None = None
                 ) -> tuple[RowTiling, list[triton.Config], GemmLaunch]:
    """The row tiling a fused launch runs on ``gpu`` (``shared``: the shared-input kernel over ``rows``
    rows, else the stacked kernel over ``members`` x ``rows``; ``sm_count``: the SMs the shared-input
    row policy fills and the stacked kernel's split-K keeps busy, 0 under the interpreter), with those
    of the candidate ``configs`` worth trying for it (``split_k_configs``, where given, for a tiling
    that splits K) and the config model's view of the launch: of the
    launch policy's tilings (``launch_policy.stacked_tilings`` / ``shared_tilings``; the stacked ones
    also with their split-K, ``launch_policy.with_k_splits``, where it splits and
    ``tuning_store.split_k_allowed()``) whose configs do not all spill
    (``configs.unspilled_tilings``), the one the config model ranks cheapest. The launcher and
    ``auto``'s cost model both ask here."""
    block_r = block_rank(rank)
    tf32x3 = precision == "tf32x3"
    if shared:
        tilings = shared_tilings(rows, cols, members, block_r, sm_count, tf32x3, sum_members)
    else:
        tilings = stacked_tilings(rows, members, block_r, tf32x3)
        if has_weight and split_k_allowed():  # each tiling split where the policy splits it, then as it is
            split = (with_k_splits(tiling, rows, members, inner, cols, sm_count) for tiling in tilings)
            tilings = tuple(dict.fromkeys((*split, *tilings)))
    problem = FusedProblem(cols, inner, DTYPE_NAMES[dtype], precision, block_r, gpu.shared_memory_per_program,
                           gpu.capability, specialisation, sum_members if shared else None, has_weight)
    options = unspilled_tilings(configs, problem, tilings, split_k_configs=split_k_configs)
    element_size = dtype.itemsize
    launches: dict[RowTiling, GemmLaunch] = {}  # each built once: the ranking's, then the one returned

    def launch_of(tiling: RowTiling) -> GemmLaunch:
        if tiling not in launches:
            launches[tiling] = (
                shared_launch(members, rows, inner, cols, rank, block_r, tiling, precision, element_size,
                              sum_members, has_weight, has_base) if shared else
                stacked_launch(members, rows, inner, cols, rank, block_r, tiling, precision, element_size,
                               has_weight, has_base))
        return launches[tiling]

    tiling, kept = cheapest_tiling(options, launch_of, gpu)
    return tiling, kept, launch_of(tiling)


def _plan(kernel: TunedKernel, args: tuple, device: torch.device, precision: str, sum_members: bool,
          has_weight: bool, has_bias: bool, has_base: bool) -> tuple[LaunchPlan, _SplitK | None]:
    """The tiling, tuning key, candidates and cost-model view of a launch (its launch key's first),
    and where the stacked kernel's tiling splits K, its split (the launch then runs the split-K kernel)."""
    rows, members, inner, cols, rank = args[_POINTERS:_POINTERS + 5]
    dtype = DTYPE_NAMES[args[0].dtype]
    block_r = block_rank(rank)
    shared = kernel is _SHARED
    specialisation = argument_specialisation(dict(zip(kernel.fn.arg_names[_POINTERS:], args[_POINTERS:])))
    gpu = gpu_spec(device)
    sm_count = multiprocessor_count(device) if device.type == "cuda" else 0
    tiling, candidates, cost = fused_tiling(shared_input_configs() if shared else fused_lora_gemm_configs(), shared,
                                            rows, members, inner, cols, rank, args[0].dtype, precision, gpu, sm_count,
                                            specialisation, sum_members, has_weight, has_base,
                                            None if shared else fused_lora_gemm_configs(split_k=True))
    tiles = -(-rows // tiling.block_m) if shared else stacked_row_tiles(rows, members, tiling)
    splits = tiling.k_splits
    tuning_key = (f"{dtype} {precision} {specialisation} BM{tiling.block_m}{' member' if tiling.member_tiles else ''}"
                  f" S{tiling.rank_slots}{' multi' if tiling.multi_pass else ''} R{block_r} K{inner}"
                  f"{f'/{splits}' if splits > 1 else ''} C{cols}"
                  f" rows{size_bucket(rows)} members{size_bucket(members)}{'' if has_weight else ' delta'}"
                  f"{(' sum' if sum_members else ' shared') if shared else ''} {gpu.name}")
    constexprs = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_BASE=has_base, DOT_PRECISION=precision,
                      BLOCK_R=block_r, BLOCK_M=tiling.block_m, RANK_SLOTS=tiling.rank_slots,
                      MULTI_PASS=tiling.multi_pass)
    if shared:
        constexprs["SUM_MEMBERS"] = sum_members
    else:
        constexprs.update(MEMBER_TILES=tiling.member_tiles, COL_TILES=1)  # a config may set COL_TILES

    if splits > 1:
        del constexprs["HAS_WEIGHT"], constexprs["HAS_BASE"], constexprs["COL_TILES"]
        narrowest = min(config.kwargs["BLOCK_N"] for config in candidates)
        split = _SplitK(splits, stacked_k_per_split(inner, tiling),
                        split_k_partial_floats(members, rows, cols, rank, splits), tiles * -(-cols // narrowest))
    else:
        split = None

    def grid(config) -> tuple[int, ...]:
        return (tiles * -(-cols // (config.kwargs["BLOCK_N"] * column_group(config))), splits)

    return LaunchPlan(tuning_key, candidates, cost, grid, constexprs, gpu), split


def launch_fused_lora_gemm(
    inp: Tensor,
    weight: Tensor | None,
    shrink: Tensor,
    expand: Tensor,
    bias: Tensor | None,
    scaling: float,
    sum_members: bool = False,
    base: Tensor | None = None,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """``out[n] = inp[n] @ weight + bias + base[n] + scaling * (inp[n] @ shrink[n]) @ expand[n]`` for
    every member, one launch (on ``inp``'s device and its current stream).

    Every tensor may have any strides (pass transposed views rather than copies, or ``transposed``).
    A launch's first call with new sizes, strides, alignment or dtype chooses its config and binds the
    compiled kernel (:mod:`.launcher`); later calls launch that kernel directly. Inside
    :func:`lora_ensemble.compiling_ahead` nothing is launched: a key's first call there submits its
    compiles, and the outputs are returned unwritten.

    Args:
        inp: ``[N, M, K]`` per-member rows, or ``[M, K]`` rows shared by every member.
        weight: ``[K, C]``, shared; None for no ``inp @ weight`` term (the low-rank update alone, or on
            top of ``base``: a base layer the kernel cannot read, e.g. a quantized one).
        shrink: ``[N, K, R]``.
        expand: ``[N, R, C]``.
        bias: ``[C]`` or None (made contiguous).
        scaling: the factor of the low-rank update.
        sum_members: with ``inp [N, M, K]``, return ``out = sum_n out[n]`` (bias excluded) as
            ``[M, C]``, computing ``(sum_n inp[n]) @ weight`` once.
        base: a precomputed output to add, ``[N, M, C]`` (``[M, C]`` with shared rows), or None.
        transposed: ``weight``, ``shrink`` and ``expand`` are given as their transposes ``[C, K]``,
            ``[N, R, K]`` and ``[N, C, R]`` (the forward's ``W0``, ``A`` and ``B`` as the layer stores
            them): read with swapped strides, no views made.

    Returns:
        ``(out, low)``: ``out [N, M, C]`` (``[M, C]`` with ``sum_members``) in inp's dtype, and
        ``low = inp @ shrink [N, M, R]`` in float32.

    Raises:
        ValueError: ``sum_members`` with shared rows, a bias or a base; ``N * M`` stacked rows beyond
            2^31 - 1; a tensor in another dtype than ``inp``.
    """
    s_weight = (0, 0) if weight is None else weight.stride()
    s_shrink, s_expand = shrink.stride(), expand.stride()
    if transposed:
        num_members, rank, inner = shrink.shape
        cols = expand.shape[1]
        s_weight, s_shrink, s_expand = s_weight[::-1], (s_shrink[0], s_shrink[2], s_shrink[1]), (
            s_expand[0], s_expand[2], s_expand[1])
    else:
        num_members, inner, rank = shrink.shape
        cols = expand.shape[2]
    shared_rows = inp.dim() == 2
    rows = inp.shape[-2]
    dtype = inp.dtype
    if sum_members and (shared_rows or bias is not None or base is not None):
        raise ValueError("sum_members needs per-member rows inp [N, M, K], and no bias or base")
    if num_members * rows > _MAX_ROWS:
        raise ValueError(f"{num_members} members x {rows} rows = {num_members * rows} stacked rows exceed "
                         f"{_MAX_ROWS}, the row count the kernels index in int32 (inp shape {tuple(inp.shape)})")
    if not (shrink.dtype == expand.dtype == dtype and (weight is None or weight.dtype == dtype)
            and (bias is None or bias.dtype == dtype) and (base is None or base.dtype == dtype)):
        raise ValueError(f"every tensor must be in inp's dtype {dtype}: shrink {shrink.dtype}, expand {expand.dtype}, "
                         f"weight {getattr(weight, 'dtype', None)}, bias {getattr(bias, 'dtype', None)}, "
                         f"base {getattr(base, 'dtype', None)}")
    device = inp.device
    # Sizes as separate arguments: PyTorch parses them ~0.5 µs faster than one tuple.
    out = (torch.empty(rows, cols, device=device, dtype=dtype) if sum_members
           else torch.empty(num_members, rows, cols, device=device, dtype=dtype))
    low = torch.empty(num_members, rows, rank, device=device, dtype=torch.float32)
    if rows == 0 or num_members == 0:
        return out.zero_(), low
    bias = bias.contiguous() if bias is not None else None
    # Member stride 0 for shared rows, a shared base and the member sum's output.
    s_in = inp.stride()
    s_in = (0, *s_in) if shared_rows else s_in
    s_out = out.stride()
    s_out = (0, *s_out) if sum_members else s_out
    s_base = (0, 0, 0) if base is None else ((0, *base.stride()) if base.dim() == 2 else base.stride())
    # Without a weight the kernel never reads weight_ptr: inp stands in for it.
    args = (inp, inp if weight is None else weight, bias, base, shrink, expand, out, low,
            rows, num_members, inner, cols, rank, *s_in, *s_weight, *s_base, *s_shrink, *s_expand,
            *s_out, *low.stride(), float(scaling))
    kernel = _SHARED if (shared_rows or sum_members) else _STACKED
    if kernel is _SHARED:
        args = (*args, 1.0 / size_bucket(num_members))  # member_sum_scale
    precision = dot_precision(dtype)
    pinned = tuning_pinned()
    misaligned = (inp.data_ptr() | shrink.data_ptr() | expand.data_ptr() | (0 if weight is None else weight.data_ptr())
                  | (0 if bias is None else bias.data_ptr()) | (0 if base is None else base.data_ptr())) & 15
    if misaligned:  # Triton specialises each pointer on its own 16-byte alignment
        misaligned = tuple(0 if t is None else t.data_ptr() & 15 for t in args[:_POINTERS])
    key = (inp.get_device(), dtype, precision, pinned, sum_members, weight is None, bias is None, base is None,
           misaligned, args[_POINTERS:-2 if kernel is _SHARED else -1])
    split = _SPLIT_K.get(key) if kernel is _STACKED else None
    if split is not None:  # decode and small batches: the reduction split in ranges
        kernel, run_args = _STACKED_SPLIT_K, (*args, *split.workspace(device))
    else:
        run_args = args
    launch = kernel.bound_launch(key)
    with launch_device(device):
        if launch is None:
            plan, split = _plan(kernel if kernel is _SHARED else _STACKED, args, device, precision, sum_members,
                                weight is not None, bias is not None, base is not None)
            if split is not None:
                if len(_SPLIT_K) >= MAX_BOUND_KEYS:
                    _SPLIT_K.clear()
                _SPLIT_K[key] = split
                kernel, run_args = _STACKED_SPLIT_K, (*args, *split.workspace(device))
                plan = dataclasses.replace(plan, reset=run_args[-3].zero_)  # the counts, before each timed run
            kernel.bind(key, run_args, plan, device, pinned)
        else:
            launch(run_args)
    return out, low
