# Launch configurations shared by the Triton kernels of this package: candidate lists for NVIDIA
# GPUs (Ampere and Hopper), the single configuration used under TRITON_INTERPRET=1 (the
# interpreter cannot benchmark), and the pruning that drops configs which cannot fit (shared
# memory) or would spill registers. Which of the kept ones runs is kernels/launcher.py's choice.
"""Candidate configurations and their pruning for the kernels in :mod:`lora_ensemble.kernels`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton

from lora_ensemble.backends import triton_interpreting

from .launch_policy import MIN_DOT_TILE, RowTiling
from .spilling_configs import SPILLING_CONFIGS

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

__all__ = [
    "DTYPE_NAMES",
    "ELEMENT_SIZE",
    "FALLBACK_FUSED_LORA_GEMM_CONFIG",
    "FUSED_LORA_GEMM_GPU_CONFIGS",
    "FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS",
    "FusedProblem",
    "LORA_GRADS_GPU_CONFIGS",
    "SHARED_INPUT_GPU_CONFIGS",
    "RANK_OR_ROW_ARGS",
    "SPECIALISED_SIZES",
    "argument_specialisation",
    "column_group",
    "dot_precision",
    "fitting_fused_lora_gemm_configs",
    "fitting_lora_grads_configs",
    "fused_lora_gemm_configs",
    "lora_grads_configs",
    "pipeline_buffers",
    "shared_input_configs",
    "size_bucket",
    "spill_key",
    "spill_key_config",
    "tf32_allowed",
    "unspilled_tilings",
]

# Integer arguments Triton specialises by 16-divisibility besides the strides (kernels/aot.py).
SPECIALISED_SIZES = frozenset({"ROWS", "INNER", "COLS", "RANK", "MEMBERS", "COLS_A", "COLS_B", "ROWS_PER_SPLIT"})
# Those that follow the rank or the row count rather than the layer's widths (rank 8 gives an odd
# RANK and rank-strided factors, 50 rows an odd ROWS, whatever the widths): the AOT gate compiles
# the "aligned" specialisation with these unspecialised, and a launch counts as aligned whatever
# they are (ROWS, MEMBERS and RANK the kernels never specialise).
RANK_OR_ROW_ARGS = frozenset({
    "ROWS", "MEMBERS", "RANK", "ROWS_PER_SPLIT",
    "stride_shrink_k", "stride_shrink_r", "stride_expand_r", "stride_expand_c",
    "stride_low_n", "stride_low_m", "stride_low_r",
    "stride_low_a_n", "stride_low_a_m", "stride_low_a_r", "stride_low_b_n", "stride_low_b_m", "stride_low_b_r",
    "stride_grad_a_r", "stride_grad_b_r", "stride_grad_b_c",
})
# fp32 accumulator registers a thread may hold before ptxas starts spilling the rest (of 255).
_ACCUMULATOR_REGISTERS = 128


# What torch.backends.cuda.matmul.fp32_precision and .allow_tf32 read, called directly: each fp32
# Triton launch asks, and the attributes' Python __getattr__ costs ~1 µs a read.
_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9


def tf32_allowed() -> bool:
    """Whether PyTorch allows TF32 for fp32 matmuls (``torch.backends.cuda.matmul.fp32_precision =
    "tf32"``, or the legacy ``allow_tf32`` / ``torch.set_float32_matmul_precision("high")``)."""
    precision = "none" if _FP32_PRECISION is None else _FP32_PRECISION("cuda", "matmul")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(torch._C._get_cublas_allow_tf32())
    except RuntimeError:  # torch refuses to read the legacy flag after a mix of old and new APIs
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' dots. fp32 inputs follow PyTorch's fp32 matmul setting:
    one TF32 tensor-core pass when TF32 is allowed, else "tf32x3" (three TF32 passes that carry the
    low mantissa bits: about fp32 accuracy at tensor-core speed, where "ieee" would fall back to
    FMA loops that spill registers). 16-bit inputs give exact products accumulated in fp32."""
    return "tf32" if dtype != torch.float32 or tf32_allowed() else "tf32x3"


def size_bucket(size: int) -> int:
    """A tuning key for a size that varies per call (rows, members): its power-of-two bucket, so
    that a config tuned for one row or member count is reused only on counts within a factor of 2
    (plain integer arithmetic: triton 3.8's ``next_power_of_2`` costs microseconds a call)."""
    return 1 << max(size - 1, 0).bit_length()


def _cfg(num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def column_group(config: triton.Config) -> int:
    """The column tiles a program of the stacked fused kernel owns: the config's ``COL_TILES``, 1
    where it sets none."""
    return config.kwargs.get("COL_TILES", 1)


# Stacked fused kernel (forward, and the dx backward): BLOCK_M comes from the launch policy; these
# tile the output columns (BLOCK_N) and the reduction (BLOCK_K). Sizes follow the Triton matmul
# tutorial's Ampere/Hopper lists, trimmed to leave registers for the rank block (the launcher times
# at most three kept ones per tuning key): the two near-copies (4, 5, 64, 32) and (8, 4, 256, 32) of
# (4, 4, 64, 64) and (8, 3, 256, 64) are gone.
FUSED_LORA_GEMM_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
    # Column groups: a program owns COL_TILES consecutive column tiles and computes its rows' rank
    # block (x A^T) once for them, not once per tile. Where the rank block is wide against the column
    # tile (rank tiles >= 32, narrow tiles) or the launch is compute-bound (prefill), the rank K-loop's
    # share of the work shrinks by COL_TILES; fewer programs fill the GPU.
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, COL_TILES=2),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, COL_TILES=2),
)
# Split-K kernel (the stacked kernel's tilings that split the reduction: decode's few row tiles): 8 warps
# only (on 4 it spills kilobytes a thread at decode's tiling), one column tile a program, and 128 x 32 on 4
# stages next to 128 x 64 on 3: the split kernel takes ~35 registers more than the stacked one at the same
# config (its ranges' shifted `in` and `shrink` pointers, live across the first rank pass for the next),
# and at decode's tiling its 128 x 64 spills under triton 3.8 (sm_80 and sm_90) where 128 x 32 does not,
# with as many bytes in flight.
FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
)
# The pruning's answer where it excludes every candidate (both fused kernels): the smallest tiles on 8
# warps. Every listed config spills at some tilings the launch policy makes (mostly the kernels with
# further rank passes at rank tiles >= 32); this one spills less. Where it spills too, the launcher
# takes a smaller row tile if one keeps a config that does not (unspilled_tilings); the AOT gate
# compiles it wherever the pruning falls back to it (benchmarks/NOTES.md, "Compile-time reports").
FALLBACK_FUSED_LORA_GEMM_CONFIG = _cfg(8, 3, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)
# Shared-input kernel: it keeps the base tile live across the member loop next to the member's own
# accumulators, so it runs on 8 warps (4 only for small rank tiles and narrow columns).
# Five, as the stacked list: (8, 3, 64, 64) and (4, 4, 64, 32) are near-copies of neighbours.
SHARED_INPUT_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),  # rank tiles 64-128: the wider 8-warp tiles spill
    _cfg(8, 3, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
)
INTERPRETER_FUSED_LORA_GEMM_CONFIG = _cfg(4, 2, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
# The candidates for 3xTF32 dots (fp32 without TF32), which split every operand into a high and a low
# part and so need about twice the registers: (warps, stages, BLOCK_N, BLOCK_K) of the two lists
# above with room for that; which of them spill at which tiles is in SPILLING_CONFIGS.
_TF32X3_STACKED = {(4, 4, 64, 64), (8, 3, 64, 32)}
_TF32X3_SHARED_INPUT = {(8, 4, 128, 32), (8, 3, 64, 32), (8, 3, 32, 32)}

# Weight gradients: BLOCK_M tiles the reduction over rows, BLOCK_C the output columns.
LORA_GRADS_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(4, 4, BLOCK_M=64, BLOCK_C=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_C=128),
    _cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
    _cfg(4, 5, BLOCK_M=32, BLOCK_C=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_C=256),
    _cfg(8, 3, BLOCK_M=32, BLOCK_C=64),  # 3xTF32 at rank tile 128: every 4-warp tile spills on sm_80
)
INTERPRETER_LORA_GRADS_CONFIG = _cfg(4, 2, BLOCK_M=32, BLOCK_C=32)


def fused_lora_gemm_configs(split_k: bool = False) -> list[triton.Config]:
    """The candidate configs of the stacked fused kernel on this machine (``split_k``: of its split-K
    form)."""
    if triton_interpreting():
        return [INTERPRETER_FUSED_LORA_GEMM_CONFIG]
    return list(FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS if split_k else FUSED_LORA_GEMM_GPU_CONFIGS)


def shared_input_configs() -> list[triton.Config]:
    """The candidate configs of the shared-input fused kernel on this machine."""
    return [INTERPRETER_FUSED_LORA_GEMM_CONFIG] if triton_interpreting() else list(SHARED_INPUT_GPU_CONFIGS)


def lora_grads_configs() -> list[triton.Config]:
    """The candidate configs of the weight-gradient kernel on this machine."""
    return [INTERPRETER_LORA_GRADS_CONFIG] if triton_interpreting() else list(LORA_GRADS_GPU_CONFIGS)


def _keep_fitting(configs: list[triton.Config], limits: dict[str, int]) -> list[triton.Config]:
    """Drop configs whose tiles exceed the (power-of-two rounded) problem size; keep at least one,
    the one with the smallest tiles."""
    bound = {name: max(MIN_DOT_TILE * 2, size_bucket(size)) for name, size in limits.items()}
    kept = [c for c in configs if all(c.kwargs[name] <= bound[name] for name in bound)]
    if kept:
        return kept
    return [min(configs, key=lambda c: tuple(c.kwargs[name] for name in bound))]


def pipeline_buffers(num_stages: int, capability: int) -> int:
    """Shared-memory copies of the K-loop tiles Triton allocates for ``num_stages``: one fewer than
    the stages on Ampere (sm_8x, ``cp.async`` pipelining), as many as the stages on Hopper (measured
    with the AOT compile: shared memory of every config on sm_80 and sm_90)."""
    return num_stages - 1 if capability < 90 else num_stages


def spill_key(kind: str, dtype: str, precision: str, block_r: int, block_m: int, config: triton.Config,
              capability: int, rank_slots: int = 1, multi_pass: bool = False, specialisation: str = "aligned",
              member_tiles: bool = False) -> tuple:
    """The key of a compiled kernel in :data:`SPILLING_CONFIGS`: the architecture family (80 for
    sm_8x, 90 for sm_90 and newer), the kernel (``"stacked"``, ``"shared"``, their weightless
    ``"stacked_delta"`` and ``"shared_delta"`` forms, the stacked split-K ``"stacked_split"``,
    ``"lora_grads"``), the dtype and dot precision,
    the rank and row tiles, the rank slots of a pass, whether the kernel has more passes and whether
    it tiles each member's rows on their own (the launch policy's ``RowTiling``), the argument
    specialisation (:func:`argument_specialisation`), warps, stages and the config's other tiles."""
    tiles = tuple(v for k, v in sorted(config.kwargs.items()) if k not in ("BLOCK_M", "GROUP_M"))
    return (90 if capability >= 90 else 80, kind, dtype, precision, block_r, block_m, rank_slots, multi_pass,
            member_tiles, specialisation, config.num_warps, config.num_stages, *tiles)


def spill_key_config(key: tuple) -> tuple:
    """The launch config's part of a :func:`spill_key` (warps, stages, the config's other tiles):
    what two keys of one config share whatever the problem."""
    return key[10:]


def argument_specialisation(args: dict) -> str:
    """Which of the AOT gate's specialisations (``kernels/aot.py``) covers a launch's integer
    arguments: ``"aligned"`` when every size and stride that follows the layer's widths is
    16-divisible or 1 (Triton turns 1 into a constant; those in :data:`RANK_OR_ROW_ARGS` may be
    anything), else ``"odd"`` (the compile with no size or stride known 16-divisible: the fewest
    vector loads and the most registers)."""
    widths = [v for name, v in args.items() if (name.startswith("stride_") or name in SPECIALISED_SIZES)
              and name not in RANK_OR_ROW_ARGS and isinstance(v, int) and not isinstance(v, bool)]
    return "odd" if any(v % 16 and v != 1 for v in widths) else "aligned"


class FusedProblem(NamedTuple):
    """One fused-kernel launch as the config pruning sees it.

    Attributes:
        cols: output columns; inner: the reduction length.
        dtype: the inputs' "fp32", "fp16" or "bf16"; precision: the dots' "tf32" or "tf32x3"
            (:func:`dot_precision`).
        block_r: the rank tile (``launch_policy.block_rank``).
        shared_memory: bytes a program may use; capability: ``10 * major + minor`` of the GPU.
        specialisation: the arguments' :func:`argument_specialisation`.
        sum_members: None for the stacked kernel; the shared-input kernel's forward (False) or dx (True).
        has_weight: False for the weightless (delta) form.
    """

    cols: int
    inner: int
    dtype: str
    precision: str
    block_r: int
    shared_memory: int
    capability: int
    specialisation: str = "aligned"
    sum_members: bool | None = None
    has_weight: bool = True


def fitting_fused_lora_gemm_configs(configs: list[triton.Config], problem: FusedProblem, tiling: RowTiling,
                                    without_measured_spills: bool = True) -> list[triton.Config]:
    """The fused-kernel configs worth trying for ``problem`` under ``tiling`` (the launch policy's
    :class:`~.launch_policy.RowTiling`).

    Drops configs with a column or reduction tile wider than the matrix; 256-wide column tiles
    with fewer than 64 rows (they spill kilobytes per thread); pipelined tiles beyond
    ``shared_memory`` bytes (:func:`pipeline_buffers` copies on sm_``capability``); fp32
    accumulators beyond 128 registers a thread: [block_m, BLOCK_N] (twice in the shared-input
    forward, ``sum_members=False``: the base tile and a member's output), the rank block
    [block_m, rank_slots * block_r], and
    the [block_m, BLOCK_K] member sum with its 16-bit high and low parts (``sum_members=True``),
    and in the ``"odd"`` specialisation a 64-bit pointer per element of the K-loop's tiles;
    in the shared-input kernel, 4-warp configs for rank tiles above 32; for 3xTF32 every config but
    the few 3xTF32 candidates (the operand split needs the registers), with the split's extra
    shared memory counted; column groups (``COL_TILES`` > 1: the stacked kernel only) where the
    tiling runs further rank passes (the group keeps one pass's rank block), with 3xTF32, or where
    the column tiles do not fill whole groups; and (``without_measured_spills``) every config in
    :data:`SPILLING_CONFIGS`. The weightless (delta) form spills at configs of its own (the
    shared-memory and register estimates keep counting the weight tile: an upper bound). Never
    empty: where nothing is kept, :data:`FALLBACK_FUSED_LORA_GEMM_CONFIG`.
    """
    cols, inner, dtype, precision, block_r, shared_memory, capability, specialisation, sum_members, _ = problem
    kept = _keep_fitting(configs, {"BLOCK_N": cols, "BLOCK_K": inner})
    output_tiles = 2 if sum_members is False else 1
    tf32x3 = precision == "tf32x3"
    block_m = tiling.block_m
    rank_width = tiling.rank_slots * block_r

    def fits(c: triton.Config) -> bool:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bn > 128 and block_m < 64:
            return False
        group = column_group(c)
        if group > 1 and (sum_members is not None or tiling.multi_pass or tf32x3 or -(-cols // bn) % group):
            return False
        if sum_members is not None and block_r > 32 and c.num_warps < 8:
            return False  # the shared-input kernel spills on 4 warps with wide rank tiles
        if tf32x3 and (c.num_warps, c.num_stages, bn, bk) not in (
                _TF32X3_STACKED if sum_members is None else _TF32X3_SHARED_INPUT):
            return False
        if without_measured_spills and _tiling_spill_key(problem, tiling, c) in SPILLING_CONFIGS:
            return False
        tile_bytes = (block_m * bk + bk * bn + bk * rank_width) * ELEMENT_SIZE[dtype] * (1.25 if tf32x3 else 1)
        smem = pipeline_buffers(c.num_stages, capability) * tile_bytes
        acc = output_tiles * block_m * bn + block_m * rank_width + (2 * block_m * bk if sum_members else 0)
        if specialisation == "odd":  # no vector loads: a 64-bit pointer (2 registers) per loaded element
            acc += 2 * (block_m * bk + bk * bn + bk * rank_width)
        return smem <= shared_memory and acc <= _ACCUMULATOR_REGISTERS * 32 * c.num_warps

    return [c for c in kept if fits(c)] or [FALLBACK_FUSED_LORA_GEMM_CONFIG]


def _fused_kind(problem: FusedProblem, tiling: RowTiling) -> str:
    if tiling.k_splits > 1:
        return "stacked_split"
    return ("stacked" if problem.sum_members is None else "shared") + ("" if problem.has_weight else "_delta")


def _tiling_spill_key(problem: FusedProblem, tiling: RowTiling, config: triton.Config) -> tuple:
    return spill_key(_fused_kind(problem, tiling), problem.dtype, problem.precision, problem.block_r, tiling.block_m,
                     config, problem.capability, tiling.rank_slots, tiling.multi_pass, problem.specialisation,
                     tiling.member_tiles)


def unspilled_tilings(configs: list[triton.Config], problem: FusedProblem, tilings: Sequence[RowTiling],
                      without_measured_spills: bool = True, split_k_configs: list[triton.Config] | None = None
                      ) -> list[tuple[RowTiling, list[triton.Config]]]:
    """A fused kernel's row tilings worth trying for ``problem``, each with the configs worth trying
    for it (:func:`fitting_fused_lora_gemm_configs` of ``configs``, or of ``split_k_configs`` where
    given for the tilings that split K): those of ``tilings`` (the launch policy's, its
    own first: ``launch_policy.stacked_tilings`` or ``shared_tilings``) for which the pruning keeps
    more than a fallback measured to spill (:data:`SPILLING_CONFIGS`); the first alone where every
    one's spills, or where the measured spills are not excluded (``without_measured_spills=False``).
    Where the policy's tiling spans more members than one pass holds, every config can spill (the
    further pass); a smaller row tile reads W0 more often without the spill."""
    def candidates(tiling: RowTiling) -> list[triton.Config]:
        return split_k_configs if split_k_configs is not None and tiling.k_splits > 1 else configs

    options = [(tiling, fitting_fused_lora_gemm_configs(candidates(tiling), problem, tiling, without_measured_spills))
               for tiling in (tilings if without_measured_spills else tilings[:1])]

    def spills(tiling: RowTiling, kept: list[triton.Config]) -> bool:
        return (kept == [FALLBACK_FUSED_LORA_GEMM_CONFIG]
                and _tiling_spill_key(problem, tiling, FALLBACK_FUSED_LORA_GEMM_CONFIG) in SPILLING_CONFIGS)

    return [option for option in options if not spills(*option)] or options[:1]


def fitting_lora_grads_configs(
    configs: list[triton.Config],
    *,
    rows: int,
    cols: int,
    dtype: str,
    precision: str,
    block_r: int,
    shared_memory: int,
    capability: int,
    specialisation: str = "aligned",
    without_measured_spills: bool = True,
) -> list[triton.Config]:
    """The weight-gradient configs worth trying (``specialisation`` as in
    :func:`fitting_fused_lora_gemm_configs`): no tile wider than the problem, pipelined tiles
    (fp32 ``low``, ``in`` in ``dtype``) within ``shared_memory`` bytes, the [block_r, BLOCK_C] fp32
    accumulator within 128 registers a thread, with 3xTF32 at most a 64 x 128 tile per 4 warps,
    and (``without_measured_spills``) none in :data:`SPILLING_CONFIGS`. Never empty."""
    kept = _keep_fitting(configs, {"BLOCK_M": rows, "BLOCK_C": cols})
    tf32x3 = precision == "tf32x3"

    def fits(c: triton.Config) -> bool:
        bm, bc = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"]
        if tf32x3 and bm * bc > 64 * 128 * c.num_warps // 4:
            return False  # the operand split doubles the register footprint
        if without_measured_spills and spill_key("lora_grads", dtype, precision, block_r, bm, c, capability,
                                                 specialisation=specialisation) in SPILLING_CONFIGS:
            return False
        tile_bytes = (block_r * bm * 4 + bm * bc * ELEMENT_SIZE[dtype]) * (1.25 if tf32x3 else 1)
        smem = pipeline_buffers(c.num_stages, capability) * tile_bytes
        return smem <= shared_memory and block_r * bc <= _ACCUMULATOR_REGISTERS * 32 * c.num_warps

    return [c for c in kept if fits(c)] or [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"])]
