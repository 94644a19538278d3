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
# Tiling (stacked kernel): grid (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N), N), the tiles of one member
# visited in grouped (GROUP_M, tl.swizzle2d) order for L2 reuse of weight. One K-loop (_k_loop)
# feeds the same in tile to two dots: in @ weight into a [BLOCK_M, BLOCK_N] fp32 accumulator and
# in @ shrink into a [BLOCK_M, BLOCK_R] fp32 one (BLOCK_R: rank padded to a power of two >= 16,
# masked). The epilogue adds scaling * low @ expand (_add_expand), then the bias, and stores once;
# the programs of the first column tile also store low.
#
# Shared-input kernel (grid (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N), G)): the base tile in @ weight is
# computed once per member group and each member's update is added to it in a loop over the
# group's members (each re-runs the K-loop for its own in @ shrink[n]), so N members cost G base
# GEMMs plus N rank-r updates. G = 1 unless the tiles alone leave the GPU mostly idle:
#   forward, shared input (SUM_MEMBERS=False): in [M, K] read by every member, out [N, M, C];
#   dx backward, shared input (SUM_MEMBERS=True): out [M, C] = (sum_n in[n]) @ weight
#   + scaling * sum_n low[n] @ expand[n], the member sum of the in tiles taken in fp32 inside the
#   K-loop (_member_sum_k_loop).
#
# Precision: every accumulator is fp32. fp32 inputs run every dot with DOT_PRECISION ("tf32" when
# PyTorch allows TF32 matmuls, else "tf32x3": configs.dot_precision). A 16-bit operand made from an
# fp32 value (scaling * low, the member sum of dy) is split into a high and a low 16-bit part and
# run as two tensor-core dots, which keeps ~16 mantissa bits (near fp32, as the CUDA kernels do);
# in fp16 its rows are first divided by a power of two where they would overflow (65504) and the
# accumulator with them, undone exactly after the dots.
"""Fused base GEMM + per-member low-rank update (forward and dx backward of a LoRA ensemble)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import (
    dot_precision,
    fused_lora_gemm_block_rows,
    fused_lora_gemm_configs,
    prune_fused_lora_gemm_configs,
    shared_input_configs,
    size_bucket,
)
from .device import check_grid_yz, launch_device, multiprocessor_count, shared_memory_per_program
from .dot import dot_fp32_lhs, split16
from .launch_policy import block_rank

__all__ = ["launch_fused_lora_gemm", "member_groups_for"]

# Autotune key: tiles and sizes that change the best config, whether W0 is read (the weightless
# delta kernels are pruned by spills of their own), the device's shared memory (configs are pruned
# by it, so a config kept for one GPU model is never reused on another), and the power-of-two
# buckets of the row and member counts.
_TUNING_KEY = ["BLOCK_M", "COLS", "INNER", "BLOCK_R", "DOT_PRECISION", "HAS_WEIGHT", "SHARED_MEMORY", "ROWS_BUCKET",
               "MEMBERS_BUCKET"]
# Arguments read by the autotuner only: not specialised, so their values never cause a recompile.
_TUNING_ONLY = ["SHARED_MEMORY", "ROWS_BUCKET", "MEMBERS_BUCKET"]
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
def _k_loop(in_ptrs, weight_ptrs, shrink_ptrs, acc, low, INNER, stride_in_k, stride_weight_k, stride_shrink_k,
            offs_k, r_mask, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, WITH_BASE: tl.constexpr,
            WITH_LOW: tl.constexpr):
    """One pass over the reduction: ``acc += in @ weight`` (WITH_BASE) and ``low += in @ shrink``
    (WITH_LOW), both fed by the same ``in`` tile. The pointers address the first K step:
    ``in_ptrs`` [BLOCK_M, BLOCK_K], ``weight_ptrs`` [BLOCK_K, BLOCK_N], ``shrink_ptrs`` [BLOCK_K, BLOCK_R]."""
    for k0 in range(0, INNER, BLOCK_K):
        k_mask = offs_k < INNER - k0
        tile = tl.load(in_ptrs, mask=k_mask[None, :], other=0.0)
        if WITH_BASE:
            w = tl.load(weight_ptrs, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(tile, w, acc, input_precision=DOT_PRECISION)
        if WITH_LOW:
            s = tl.load(shrink_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
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
def _tile_of(pid, ROWS, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column tile of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns
    together, so a column strip of ``weight`` stays in L2 while they use it."""
    num_pid_n = tl.cdiv(COLS, BLOCK_N)
    return tl.swizzle2d(pid // num_pid_n, pid % num_pid_n, tl.cdiv(ROWS, BLOCK_M), num_pid_n, GROUP_M)


@triton.jit
def _load_rows(ptr, rows, cols, stride_m, stride_c):
    """The [BLOCK_M, BLOCK_C] tile at (wrapped, in-range) ``rows``, ``cols`` of a matrix, in fp32."""
    return tl.load(ptr + rows[:, None] * stride_m + cols[None, :] * stride_c).to(tl.float32)


@triton.jit
def _store_rows(ptr, value, offs_m, offs_c, ROWS, COLS, stride_m, stride_c):
    """Store ``value`` [BLOCK_M, BLOCK_C] at rows ``offs_m``, columns ``offs_c`` of a [ROWS, COLS] matrix."""
    mask = (offs_m[:, None] < ROWS) & (offs_c[None, :] < COLS)
    tl.store(ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"BLOCK_M": fused_lora_gemm_block_rows})
@triton.autotune(configs=fused_lora_gemm_configs(), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": prune_fused_lora_gemm_configs})
@triton.jit(do_not_specialize=_TUNING_ONLY)
def _fused_lora_gemm_kernel(
    in_ptr, weight_ptr, bias_ptr, base_ptr, shrink_ptr, expand_ptr, out_ptr, low_ptr,
    ROWS, INNER, COLS, RANK, scaling,
    stride_in_n, stride_in_m, stride_in_k,
    stride_weight_k, stride_weight_c,
    stride_base_n, stride_base_m, stride_base_c,
    stride_shrink_n, stride_shrink_k, stride_shrink_r,
    stride_expand_n, stride_expand_r, stride_expand_c,
    stride_out_n, stride_out_m, stride_out_c,
    stride_low_n, stride_low_m, stride_low_r,
    SHARED_MEMORY, ROWS_BUCKET, MEMBERS_BUCKET,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    member = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _tile_of(tl.program_id(0), ROWS, COLS, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around (their results are never stored); the rank
    # columns past RANK are masked to zero so that they add nothing to the update.
    rows = offs_m % ROWS
    cols = offs_c % COLS
    r_mask = offs_r < RANK

    acc, low = _k_loop(
        in_ptr + member * stride_in_n + rows[:, None] * stride_in_m + offs_k[None, :] * stride_in_k,
        weight_ptr + offs_k[:, None] * stride_weight_k + cols[None, :] * stride_weight_c,
        shrink_ptr + member * stride_shrink_n + offs_k[:, None] * stride_shrink_k + offs_r[None, :] * stride_shrink_r,
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
        INNER, stride_in_k, stride_weight_k, stride_shrink_k, offs_k, r_mask, DOT_PRECISION, BLOCK_K,
        WITH_BASE=HAS_WEIGHT, WITH_LOW=True,
    )
    if pid_n == 0:
        _store_rows(low_ptr + member * stride_low_n, low, offs_m, offs_r, ROWS, RANK, stride_low_m, stride_low_r)
    acc = _add_expand(acc, low, expand_ptr + member * stride_expand_n, offs_r, offs_c, RANK, COLS, scaling,
                      stride_expand_r, stride_expand_c, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += _load_rows(base_ptr + member * stride_base_n, rows, cols, stride_base_m, stride_base_c)
    _store_rows(out_ptr + member * stride_out_n, acc, offs_m, offs_c, ROWS, COLS, stride_out_m, stride_out_c)


@triton.heuristics({"BLOCK_M": fused_lora_gemm_block_rows})
@triton.autotune(configs=shared_input_configs(), key=_TUNING_KEY + ["SUM_MEMBERS"],
                 prune_configs_by={"early_config_prune": prune_fused_lora_gemm_configs})
@triton.jit(do_not_specialize=_TUNING_ONLY)
def _fused_lora_gemm_shared_kernel(
    in_ptr, weight_ptr, bias_ptr, base_ptr, shrink_ptr, expand_ptr, out_ptr, low_ptr,
    ROWS, INNER, COLS, RANK, MEMBERS, scaling, member_sum_scale,
    stride_in_n, stride_in_m, stride_in_k,
    stride_weight_k, stride_weight_c,
    stride_base_n, stride_base_m, stride_base_c,
    stride_shrink_n, stride_shrink_k, stride_shrink_r,
    stride_expand_n, stride_expand_r, stride_expand_c,
    stride_out_n, stride_out_m, stride_out_c,
    stride_low_n, stride_low_m, stride_low_r,
    SHARED_MEMORY, ROWS_BUCKET, MEMBERS_BUCKET,
    SUM_MEMBERS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), ROWS, COLS, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % ROWS
    cols = offs_c % COLS
    r_mask = offs_r < RANK
    in_tile = in_ptr + rows[:, None] * stride_in_m + offs_k[None, :] * stride_in_k
    weight_tile = weight_ptr + offs_k[:, None] * stride_weight_k + cols[None, :] * stride_weight_c
    shrink_tile = shrink_ptr + offs_k[:, None] * stride_shrink_k + offs_r[None, :] * stride_shrink_r

    # The base tile, once: in @ weight, or (sum_n in[n]) @ weight; or the given base output's tile.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_WEIGHT:
        if SUM_MEMBERS:
            acc = _member_sum_k_loop(in_tile, weight_tile, acc, INNER, MEMBERS, member_sum_scale, stride_in_n,
                                     stride_in_k, stride_weight_k, offs_k, DOT_PRECISION, BLOCK_M, BLOCK_K)
            acc = acc * (1.0 / member_sum_scale)
        else:
            acc, _ = _k_loop(in_tile, weight_tile, shrink_tile, acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                             INNER, stride_in_k, stride_weight_k, stride_shrink_k, offs_k, r_mask, DOT_PRECISION,
                             BLOCK_K, WITH_BASE=True, WITH_LOW=False)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += _load_rows(base_ptr, rows, cols, stride_base_m, stride_base_c)

    # The low-rank update of each member of this program's group on top of it (grid axis 1 splits
    # the members into groups; one group when SUM_MEMBERS). The member pointers advance by one
    # member stride per iteration (pointer arithmetic, so no 32-bit offset overflow).
    members_per_group = tl.cdiv(MEMBERS, tl.num_programs(1))
    first_member = tl.program_id(1) * members_per_group
    last_member = min(first_member + members_per_group, MEMBERS)
    first = first_member.to(tl.int64)
    in_member = in_tile + first * stride_in_n
    shrink_member = shrink_tile + first * stride_shrink_n
    expand_member = expand_ptr + first * stride_expand_n
    low_member = low_ptr + first * stride_low_n
    out_member = out_ptr + first * stride_out_n
    for _ in range(first_member, last_member):
        _, low = _k_loop(in_member, weight_tile, shrink_member, acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                         INNER, stride_in_k, stride_weight_k, stride_shrink_k, offs_k, r_mask, DOT_PRECISION,
                         BLOCK_K, WITH_BASE=False, WITH_LOW=True)
        if pid_n == 0:
            _store_rows(low_member, low, offs_m, offs_r, ROWS, RANK, stride_low_m, stride_low_r)
        if SUM_MEMBERS:
            acc = _add_expand(acc, low, expand_member, offs_r, offs_c, RANK, COLS, scaling, stride_expand_r,
                              stride_expand_c, DOT_PRECISION)
        else:
            out = _add_expand(acc, low, expand_member, offs_r, offs_c, RANK, COLS, scaling, stride_expand_r,
                              stride_expand_c, DOT_PRECISION)
            _store_rows(out_member, out, offs_m, offs_c, ROWS, COLS, stride_out_m, stride_out_c)
        in_member += stride_in_n
        shrink_member += stride_shrink_n
        expand_member += stride_expand_n
        low_member += stride_low_n
        out_member += stride_out_n
    if SUM_MEMBERS:
        _store_rows(out_ptr, acc, offs_m, offs_c, ROWS, COLS, stride_out_m, stride_out_c)


def member_groups_for(rows: int, cols: int, num_members: int, device: torch.device) -> int:
    """Member groups of the shared-input forward: 1 (one base GEMM) while the output tiles fill
    the GPU; for small batches (fewer 64 x 128 tiles than SMs) enough groups to occupy every SM,
    trading a recomputed base tile for parallelism."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(rows, 64) * triton.cdiv(cols, 128)
    return max(1, min(num_members, multiprocessor_count(device) // tiles))


def launch_fused_lora_gemm(
    inp: Tensor,
    weight: Tensor | None,
    shrink: Tensor,
    expand: Tensor,
    bias: Tensor | None,
    scaling: float,
    sum_members: bool = False,
    member_groups: int | None = None,
    base: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``out[n] = inp[n] @ weight + bias + base[n] + scaling * (inp[n] @ shrink[n]) @ expand[n]`` for
    every member, one launch (on ``inp``'s device and its current stream).

    Every tensor may have any strides (pass transposed views rather than copies).

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
        member_groups: with shared rows ``inp [M, K]``, how many groups of members get their own
            programs, each computing ``inp @ weight`` once for its group; None picks it from the
            shapes and the GPU (:func:`member_groups_for`). Always 1 with ``sum_members``.
        base: a precomputed output to add, ``[N, M, C]`` (``[M, C]`` with shared rows), or None.

    Returns:
        ``(out, low)``: ``out [N, M, C]`` (``[M, C]`` with ``sum_members``) in inp's dtype, and
        ``low = inp @ shrink [N, M, R]`` in float32.

    Raises:
        ValueError: ``sum_members`` with shared rows, a bias or a base; more than 65535 members in the
            stacked layout (grid axis 1).
    """
    num_members, inner, rank = shrink.shape
    cols = expand.shape[2]
    shared_rows = inp.dim() == 2
    rows = inp.shape[-2]
    if sum_members and (shared_rows or bias is not None or base is not None):
        raise ValueError("sum_members needs per-member rows inp [N, M, K], and no bias or base")
    if not (shared_rows or sum_members):
        check_grid_yz("num_members", num_members, f"shrink shape {tuple(shrink.shape)}, stacked layout")
    out_shape = (rows, cols) if sum_members else (num_members, rows, cols)
    out = torch.empty(out_shape, device=inp.device, dtype=inp.dtype)
    low = torch.empty((num_members, rows, rank), device=inp.device, dtype=torch.float32)
    if rows == 0:
        return out.zero_(), low
    bias = bias.contiguous() if bias is not None else None
    inp3 = inp.unsqueeze(0) if shared_rows else inp  # member stride 0 when shared
    out3 = out.unsqueeze(0) if sum_members else out
    base3 = base.unsqueeze(0) if base is not None and base.dim() == 2 else base  # member stride 0 when shared
    arguments = dict(
        # Without a weight the kernel never reads weight_ptr: any tensor of the dtype stands in for it.
        in_ptr=inp3, weight_ptr=weight if weight is not None else inp3, bias_ptr=bias, base_ptr=base3,
        shrink_ptr=shrink, expand_ptr=expand, out_ptr=out3, low_ptr=low,
        ROWS=rows, INNER=inner, COLS=cols, RANK=rank, scaling=float(scaling),
        stride_in_n=0 if shared_rows else inp3.stride(0), stride_in_m=inp3.stride(1), stride_in_k=inp3.stride(2),
        stride_weight_k=weight.stride(0) if weight is not None else 0,
        stride_weight_c=weight.stride(1) if weight is not None else 0,
        stride_base_n=base.stride(0) if base is not None and base.dim() == 3 else 0,
        stride_base_m=0 if base3 is None else base3.stride(1), stride_base_c=0 if base3 is None else base3.stride(2),
        stride_shrink_n=shrink.stride(0), stride_shrink_k=shrink.stride(1), stride_shrink_r=shrink.stride(2),
        stride_expand_n=expand.stride(0), stride_expand_r=expand.stride(1), stride_expand_c=expand.stride(2),
        stride_out_n=0 if sum_members else out3.stride(0), stride_out_m=out3.stride(1), stride_out_c=out3.stride(2),
        stride_low_n=low.stride(0), stride_low_m=low.stride(1), stride_low_r=low.stride(2),
        SHARED_MEMORY=shared_memory_per_program(inp.device), ROWS_BUCKET=size_bucket(rows),
        MEMBERS_BUCKET=size_bucket(num_members), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_BASE=base is not None, DOT_PRECISION=dot_precision(inp.dtype), BLOCK_R=block_rank(rank),
    )
    with launch_device(inp):
        if shared_rows or sum_members:
            if sum_members:
                member_groups = 1
            elif member_groups is None:
                member_groups = member_groups_for(rows, cols, num_members, inp.device)
            groups = max(1, min(member_groups, num_members))

            def grid(cfg):
                return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]), groups)

            _fused_lora_gemm_shared_kernel[grid](
                MEMBERS=num_members, member_sum_scale=1.0 / size_bucket(num_members), SUM_MEMBERS=sum_members,
                **arguments)
        else:
            def grid(cfg):
                return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]), num_members)

            _fused_lora_gemm_kernel[grid](**arguments)
    return out, low
