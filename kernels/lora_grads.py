# Gradients of the low-rank factors of every member, both in one launch (the Triton counterpart of
# csrc/cuda/lora_grads.cuh):
#
#     dA[n] = scaling * dyb[n]^T @ x[n]      [R, d]
#     dB[n] = scaling * (dy[n]^T @ xa[n])    [k, R], computed as its transpose xa[n]^T @ dy[n] [R, k]
#
# Both are grad = scaling * low^T @ in, with low [M, R] float32 (dyb or xa: the rank-r products the
# dx / forward kernels stored) and in [M, C] in the input dtype (x or dy): a reduction over the M
# rows of each member.
#
# Tiling: grid ((cdiv(d, BLOCK_C) + cdiv(k, BLOCK_C)) * N, SPLIT), the members on axis 0 (no 65535
# limit). Program (t + n * tiles, j) owns a
# [BLOCK_R, BLOCK_C] tile of dA[n] (t < cdiv(d, BLOCK_C)) or of dB[n]^T (the other t), with the
# whole (padded, masked) rank in one tile, and reduces rows [j * ROWS_PER_SPLIT, (j+1) *
# ROWS_PER_SPLIT) of member n in BLOCK_M steps with an fp32 accumulator. With SPLIT = 1 the tile is
# scaled and stored once (deterministic); with SPLIT > 1 the partial sums are atomically added
# into float32 outputs that start at zero (fp32 reduction across programs; for 16-bit inputs the
# launcher then casts them, one more small kernel each). A shared input x is read with member
# stride 0. The fp32 low operand meets the 16-bit in operand through kernels/dot.py (split into
# high and low 16-bit parts, fp16 rows kept in range); fp32 dots use DOT_PRECISION.
"""Grouped weight gradients dA and dB of all members of a LoRA ensemble, one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lora_ensemble.tuning_store import tuning_pinned

from .configs import (
    DTYPE_NAMES,
    argument_specialisation,
    dot_precision,
    fitting_lora_grads_configs,
    lora_grads_configs,
    size_bucket,
)
from .device import (
    check_grid_yz,
    compute_capability,
    launch_device,
    multiprocessor_count,
    shared_memory_per_program,
)
from .dot import dot_fp32_lhs
from .gpu_specs import gpu_spec
from .launch_costs import lora_grads_launch
from .launch_policy import block_rank, grad_row_splits, grad_rows_per_split
from .launcher import LaunchPlan, TunedKernel

__all__ = ["launch_lora_grads", "row_splits"]

# Not specialised (no recompile for their values): the row and rank counts (compared against only;
# Triton would compile another kernel for a value of 1 and for 16-divisible ones).
_UNSPECIALISED = ["ROWS", "RANK"]


@triton.jit
def _lora_grad_tile(
    low_ptr, in_ptr, grad_ptr, col_tile, row_start, row_end, RANK, COLS, scaling,
    stride_low_m, stride_low_r, stride_in_m, stride_in_c, stride_grad_r, stride_grad_c,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``grad[:, tile] (+)= scaling * low[rows]^T @ in[rows, tile]`` for rows in [row_start, row_end)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = offs_r < RANK
    c_mask = offs_c < COLS
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        low_t = tl.load(low_ptr + offs_m[None, :] * stride_low_m + offs_r[:, None] * stride_low_r,
                        mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        tile = tl.load(in_ptr + offs_m[:, None] * stride_in_m + offs_c[None, :] * stride_in_c,
                       mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        acc = dot_fp32_lhs(low_t, tile, acc, DOT_PRECISION)
    acc *= scaling
    grad_ptrs = grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c
    grad_mask = r_mask[:, None] & c_mask[None, :]
    if ATOMIC:
        tl.atomic_add(grad_ptrs, acc, mask=grad_mask)
    else:
        tl.store(grad_ptrs, acc.to(grad_ptr.dtype.element_ty), mask=grad_mask)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _lora_grads_kernel(
    low_a_ptr, in_a_ptr, grad_a_ptr, low_b_ptr, in_b_ptr, grad_b_ptr,
    ROWS, RANK, COLS_A, COLS_B, ROWS_PER_SPLIT,
    stride_low_a_n, stride_low_a_m, stride_low_a_r, stride_in_a_n, stride_in_a_m, stride_in_a_c,
    stride_grad_a_n, stride_grad_a_r, stride_grad_a_c,
    stride_low_b_n, stride_low_b_m, stride_low_b_r, stride_in_b_n, stride_in_b_m, stride_in_b_c,
    stride_grad_b_n, stride_grad_b_r, stride_grad_b_c,
    scaling,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tiles_a = tl.cdiv(COLS_A, BLOCK_C)
    tiles = tiles_a + tl.cdiv(COLS_B, BLOCK_C)
    tile = tl.program_id(0) % tiles
    member = (tl.program_id(0) // tiles).to(tl.int64)
    row_start = tl.program_id(1).to(tl.int64) * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, ROWS)
    if tile < tiles_a:
        _lora_grad_tile(
            low_a_ptr + member * stride_low_a_n, in_a_ptr + member * stride_in_a_n,
            grad_a_ptr + member * stride_grad_a_n,
            tile, row_start, row_end, RANK, COLS_A, scaling,
            stride_low_a_m, stride_low_a_r, stride_in_a_m, stride_in_a_c, stride_grad_a_r, stride_grad_a_c,
            ATOMIC, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_C,
        )
    else:
        _lora_grad_tile(
            low_b_ptr + member * stride_low_b_n, in_b_ptr + member * stride_in_b_n,
            grad_b_ptr + member * stride_grad_b_n,
            tile - tiles_a, row_start, row_end, RANK, COLS_B, scaling,
            stride_low_b_m, stride_low_b_r, stride_in_b_m, stride_in_b_c, stride_grad_b_r, stride_grad_b_c,
            ATOMIC, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_C,
        )


def row_splits(rows: int, programs_per_split: int, device: torch.device) -> int:
    """How many row ranges the weight-gradient reduction is split into on ``device``
    (:func:`~.launch_policy.grad_row_splits`); 1 off CUDA and under deterministic algorithms."""
    if device.type != "cuda":
        return 1
    return grad_row_splits(rows, programs_per_split, multiprocessor_count(device),
                           torch.are_deterministic_algorithms_enabled())


_GRADS = TunedKernel("lora_grads", _lora_grads_kernel)
_POINTERS = 6  # low_a, in_a, grad_a, low_b, in_b, grad_b; then ROWS, RANK, COLS_A, COLS_B, ROWS_PER_SPLIT, strides


def _plan(args: tuple, device: torch.device, precision: str, atomic: bool, shared_input: bool,
          num_members: int, splits: int) -> LaunchPlan:
    """The tuning key, candidates and cost-model view of a launch (its launch key's first)."""
    grad_a, grad_b = args[2], args[5]
    rows, rank, d_in, k_out, rows_per_split = args[_POINTERS:_POINTERS + 5]
    dtype = DTYPE_NAMES[args[1].dtype]
    block_r = block_rank(rank)
    specialisation = argument_specialisation(dict(zip(_GRADS.fn.arg_names[_POINTERS:], args[_POINTERS:])))
    candidates = fitting_lora_grads_configs(
        lora_grads_configs(), rows=rows_per_split, cols=max(d_in, k_out), dtype=dtype, precision=precision,
        block_r=block_r, shared_memory=shared_memory_per_program(device), capability=compute_capability(device),
        specialisation=specialisation)
    gpu = gpu_spec(device)
    cost = lora_grads_launch(num_members, rows, d_in, k_out, rank, block_r, splits, rows_per_split, precision,
                             args[1].element_size(), shared_input)
    tuning_key = (f"{dtype} {precision} {specialisation} R{block_r} d{d_in} k{k_out} rows{size_bucket(rows_per_split)}"
                  f"{' atomic' if atomic else ''} {gpu.name}")

    def grid(config) -> tuple[int, ...]:
        block_c = config.kwargs["BLOCK_C"]
        return ((-(-d_in // block_c) + -(-k_out // block_c)) * num_members, splits)

    def reset() -> None:  # the split reduction adds into zeroed outputs
        grad_a.zero_()
        grad_b.zero_()

    return LaunchPlan(tuning_key, candidates, cost, grid, dict(ATOMIC=atomic, DOT_PRECISION=precision, BLOCK_R=block_r),
                      gpu, reset if atomic else None)


def launch_lora_grads(
    grad_out: Tensor,
    x: Tensor,
    xa: Tensor,
    dyb: Tensor,
    scaling: float,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``dA = scaling * dyb^T @ x`` and ``dB = scaling * grad_out^T @ xa`` for every member, one
    launch (on ``grad_out``'s device and its current stream; the compiled kernel bound per launch
    key as in :func:`~.fused_lora_gemm.launch_fused_lora_gemm`; inside
    :func:`lora_ensemble.compiling_ahead` nothing is launched: a key's first call there submits its compiles,
    and the outputs are left unwritten).

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

    Raises:
        ValueError: more than 65535 row splits (grid axis 1).
    """
    num_members, rows, k_out = grad_out.shape
    rank, d_in = xa.shape[2], x.shape[-1]
    dtype, device = grad_out.dtype, grad_out.device
    if splits is None:
        splits = row_splits(rows, num_members * (-(-d_in // 128) + -(-k_out // 128)), device)
    rows_per_split = grad_rows_per_split(rows, splits)
    splits = -(-max(rows, 1) // rows_per_split)
    check_grid_yz("splits", splits, f"{rows} rows in ranges of {rows_per_split}")
    atomic = splits > 1
    out_dtype = torch.float32 if atomic else dtype
    alloc = torch.zeros if (atomic or rows == 0) else torch.empty
    grad_a = alloc(num_members, rank, d_in, device=device, dtype=out_dtype)  # sizes unpacked: parsed faster
    grad_b = alloc(num_members, k_out, rank, device=device, dtype=out_dtype)
    if rows > 0 and num_members > 0:
        shared_input = x.dim() == 2
        s_x = (0, *x.stride()) if shared_input else x.stride()
        s_grad_b = grad_b.stride()  # written as dB^T [N, R, k]: its strides swapped, no view made
        args = (dyb, x, grad_a, xa, grad_out, grad_b, rows, rank, d_in, k_out, rows_per_split,
                *dyb.stride(), *s_x, *grad_a.stride(), *xa.stride(), *grad_out.stride(), s_grad_b[0], s_grad_b[2],
                s_grad_b[1], float(scaling))
        precision = dot_precision(dtype)
        pinned = tuning_pinned()
        misaligned = (dyb.data_ptr() | x.data_ptr() | xa.data_ptr() | grad_out.data_ptr()) & 15
        if misaligned:  # Triton specialises each pointer on its own 16-byte alignment
            misaligned = tuple(t.data_ptr() & 15 for t in args[:_POINTERS])
        # num_members sets the grid but is no argument of the kernel (the strides do not say it)
        key = (grad_out.get_device(), dtype, x.dtype, precision, pinned, misaligned, num_members, args[_POINTERS:-1])
        launch = _GRADS.bound_launch(key)
        with launch_device(device):
            if launch is None:
                _GRADS.bind(key, args, _plan(args, device, precision, atomic, shared_input, num_members, splits),
                            device, pinned)
            else:
                launch(args)
    if out_dtype == dtype:  # (Tensor.to costs ~0.7 µs even when the dtype matches)
        return grad_a, grad_b
    return grad_a.to(dtype), grad_b.to(dtype)

