# A cost model of one launch of a GEMM-shaped Triton kernel under one config, used to rank the
# autotune candidates of a key so that only the best few are compiled and timed (the way LyCORIS
# ranks its tile plans), and by lora_ensemble/auto_costs.py to estimate whole backends.
#
# A launch is programs that each own a [tile_rows, BN] output tile (BN: the config's column tile) and
# reduce over `inner` in steps of BK; with a column group (the config's COL_TILES, the stacked fused
# kernel) a program owns COL_TILES consecutive such tiles, the rank block computed in the first one's
# K loop only, the others' K loops, expands, prologue and epilogue run for each. Per program and step
# the model counts the dot FLOPs and the bytes staged through shared memory; an SM runs `resident`
# programs at once (bounded by shared memory, registers, threads) and the busiest SM gets
# ceil(programs / SMs) of them:
#
#   step clocks    = max(FLOPs / (dense FLOP per SM-clock x efficiency), smem bytes / 128 B per clock)
#   program        = throughput: sum of its steps;  latency: steps x 600 / (stages - 1) + 2000 clocks
#   SM time        = rounds x max(latency, concurrent x throughput),  concurrent = min(resident, per-SM)
#   launch seconds = max(SM time / clock, L2 bytes / L2 bandwidth, DRAM bytes / DRAM bandwidth) + 2 µs
#
# L2 bytes are every program's operand loads (what tiling re-reads: W0 once per row tile), DRAM bytes
# the launch's unavoidable traffic. The numbers are estimates for ranking and for comparing backends;
# the autotuner's timings, where they exist, decide.
"""Cost model of GEMM-shaped kernel launches: estimate one config, rank a key's candidates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .gpu_specs import SHARED_MEMORY_BYTES_PER_CLOCK, GpuSpec

__all__ = ["KERNEL_OVERHEAD_S", "ConfigCost", "GemmLaunch", "best_configs", "cheapest_tiling", "config_cost",
           "rank_configs"]

# Clocks of one K step's global loads (an L2 hit plus queueing), hidden by the stages in flight.
ITER_LATENCY_CLOCKS = 600
# Clocks of a program's prologue (filling the pipeline) and epilogue (stores).
PROGRAM_LATENCY_CLOCKS = 2000
# Device time of one kernel beyond its work: launch latency and the tail of the last wave.
KERNEL_OVERHEAD_S = 2e-6
# Registers a thread holds beyond its accumulators and operand fragments (addresses, masks, indices).
_BASE_REGISTERS = 32
_MAX_PROGRAMS_PER_SM = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmLaunch:
    """One launch of a GEMM-shaped kernel, as far as the config model needs it.

    Attributes:
        tile_rows: rows of every output tile, fixed before the config (a heuristic's row tile; the
            weight-gradient kernel's rank tile).
        row_tiles: programs per column tile (row tiles x members x row splits, whatever the grid holds).
        cols: output columns, tiled by the config's ``col_tile``.
        inner: reduction length of one program, stepped by the config's ``inner_tile``.
        precision: the dots' :meth:`GpuSpec.dot_flops` key (``"16bit"``, ``"tf32"``, ``"tf32x3"``, ``"fp32"``).
        lhs_bytes: element size of the row operand ``[tile_rows, BK]``.
        rhs_bytes: element size of the column operand ``[BK, BN]`` and of the rank operand ``[BK, rank_tile]``.
        dram_bytes: the launch's unavoidable DRAM traffic (every operand once, every result once).
        column_operand: the main loop multiplies by a ``[BK, BN]`` column tile (False: a delta kernel).
        rank_tile: columns of the rank block computed from the row tile (``x A^T`` of the members a
            pass holds side by side: rank slots x rank tile); 0 for none.
        rank_in_main: the rank block rides along the main K loop (one more dot per step).
        rank_loops: further K loops over the rank block alone per program, an average over the
            programs (the stacked kernel's further rank passes; the shared-input dx's one per member).
        lhs_loads: row-operand tiles loaded and summed per main step (the shared-input dx sums the
            members' ``dy``).
        output_tiles: fp32 ``[tile_rows, BN]`` accumulators live at once (2 in the shared-input forward).
        expands: expand dots ``[tile_rows, expand_rank] @ [expand_rank, BN]`` per program (one per
            member the row tile holds), an average over the programs.
        expand_rank: the rank of one expand dot (0: ``rank_tile``).
        expand_passes: dots per expand product (2 where the fp32 rank product meets a 16-bit factor
            as high and low parts).
        dot_passes: dots per main and rank product (2 where an fp32 operand meets a 16-bit one as high
            and low parts: the weight-gradient kernel).
        efficiency: fraction of the dense peak the kernel's dots reach at best.
        col_tile, inner_tile: the names of the config's column and reduction tiles.
    """

    tile_rows: int
    row_tiles: int
    cols: int
    inner: int
    precision: str
    lhs_bytes: int
    rhs_bytes: int
    dram_bytes: int
    column_operand: bool = True
    rank_tile: int = 0
    rank_in_main: bool = True
    rank_loops: float = 0
    lhs_loads: int = 1
    output_tiles: int = 1
    expands: float = 0
    expand_rank: int = 0
    expand_passes: int = 1
    dot_passes: int = 1
    efficiency: float = 0.8
    col_tile: str = "BLOCK_N"
    inner_tile: str = "BLOCK_K"


@dataclass(frozen=True)
class ConfigCost:
    """The model's estimate for one config: seconds, the grid, and what bounds it."""

    seconds: float
    programs: int
    resident: int
    waves: float
    bound: str


def _pipeline_buffers(num_stages: int, capability: int) -> int:
    # Triton allocates stages - 1 shared-memory copies of the K-loop tiles below sm_90, stages on sm_90+.
    return max(1, num_stages - 1 if capability < 90 else num_stages)


def config_cost(config: Any, launch: GemmLaunch, gpu: GpuSpec) -> ConfigCost:
    """Estimated device time of ``launch`` under ``config`` (anything with ``kwargs``, ``num_warps``
    and ``num_stages``, like ``triton.Config``) on ``gpu``. A config whose pipelined tiles exceed the
    shared memory one program may use costs ``inf``."""
    bn, bk = config.kwargs[launch.col_tile], config.kwargs[launch.inner_tile]
    group = config.kwargs.get("COL_TILES", 1)  # column tiles a program owns
    threads = 32 * config.num_warps
    rows = launch.tile_rows
    programs = launch.row_tiles * _cdiv(launch.cols, bn * group)
    k_steps = _cdiv(launch.inner, bk)
    rank_in_main = launch.rank_tile if launch.rank_in_main else 0
    main_cols = (bn if launch.column_operand else 0) + rank_in_main
    main_steps = k_steps if main_cols else 0
    base_steps = k_steps * (group - 1) if launch.column_operand else 0  # the group's further tiles
    rank_steps = k_steps * launch.rank_loops

    # Per program: FLOPs and bytes staged through shared memory, main loop, rank loops and epilogue.
    main_flops = 2 * rows * main_cols * bk * launch.dot_passes
    main_bytes = launch.lhs_loads * rows * bk * launch.lhs_bytes + bk * main_cols * launch.rhs_bytes
    base_flops = 2 * rows * bn * bk * launch.dot_passes
    base_bytes = launch.lhs_loads * rows * bk * launch.lhs_bytes + bk * bn * launch.rhs_bytes
    rank_flops = 2 * rows * launch.rank_tile * bk * launch.dot_passes
    rank_bytes = rows * bk * launch.lhs_bytes + bk * launch.rank_tile * launch.rhs_bytes
    expands = launch.expands * group
    expand_rank = launch.expand_rank or launch.rank_tile
    expand_flops = 2 * rows * expand_rank * bn * launch.expand_passes
    expand_bytes = expand_rank * bn * launch.rhs_bytes

    flops_per_clock = gpu.dot_flops(launch.precision) / (gpu.sm_count * gpu.clock_hz) * launch.efficiency
    smem_rate = SHARED_MEMORY_BYTES_PER_CLOCK

    def step_clocks(flops: int, nbytes: int) -> float:
        return max(flops / flops_per_clock, nbytes / smem_rate)

    throughput = (main_steps * step_clocks(main_flops, main_bytes)
                  + base_steps * step_clocks(base_flops, base_bytes)
                  + rank_steps * step_clocks(rank_flops, rank_bytes)
                  + expands * step_clocks(expand_flops, expand_bytes))
    compute_clocks = (main_steps * main_flops + base_steps * base_flops + rank_steps * rank_flops
                      + expands * expand_flops) / flops_per_clock
    latency = ((main_steps + base_steps + rank_steps) * ITER_LATENCY_CLOCKS / max(1, config.num_stages - 1)
               + group * PROGRAM_LATENCY_CLOCKS)

    # Occupancy: pipelined tiles in shared memory, fp32 accumulators and operand fragments in registers.
    staged = rows * bk * launch.lhs_bytes + bk * max(main_cols, launch.rank_tile) * launch.rhs_bytes
    smem = _pipeline_buffers(config.num_stages, gpu.capability) * staged
    if smem > gpu.shared_memory_per_program:
        return ConfigCost(math.inf, programs, 0, math.inf, "shared memory per program")
    accumulators = launch.output_tiles * rows * bn + rows * launch.rank_tile
    fragments = (rows * bk * launch.lhs_bytes + bk * main_cols * launch.rhs_bytes) / 4
    registers = min(255, _BASE_REGISTERS + math.ceil((accumulators + fragments) / threads))
    resident = max(1, min(gpu.shared_memory_per_sm // (smem + 1024),
                          gpu.registers_per_sm // (8 * math.ceil(registers / 8) * threads),
                          gpu.max_threads_per_sm // threads, _MAX_PROGRAMS_PER_SM))

    per_sm = _cdiv(programs, gpu.sm_count)
    concurrent = min(resident, per_sm)
    sm_clocks = _cdiv(per_sm, concurrent) * max(latency, concurrent * throughput)
    program_bytes = main_steps * main_bytes + base_steps * base_bytes + rank_steps * rank_bytes + expands * expand_bytes
    times = {
        "latency" if latency >= concurrent * throughput else (
            "compute" if compute_clocks >= throughput * 0.999 else "shared memory"): sm_clocks / gpu.clock_hz,
        "L2": programs * program_bytes / gpu.l2_bytes_per_s,
        "DRAM": launch.dram_bytes / gpu.dram_bytes_per_s,
    }
    bound = max(times, key=times.get)
    waves = programs / (gpu.sm_count * resident)
    return ConfigCost(times[bound] + KERNEL_OVERHEAD_S, programs, resident, waves, bound)


def rank_configs(configs: Sequence[Any], launch: GemmLaunch, gpu: GpuSpec) -> list[tuple[Any, ConfigCost]]:
    """Every config with its estimate, fastest first (ties keep the list's order)."""
    costs = [(config, config_cost(config, launch, gpu)) for config in configs]
    return sorted(costs, key=lambda pair: pair[1].seconds)


def best_configs(configs: Sequence[Any], launch: GemmLaunch, gpu: GpuSpec, keep: int = 3) -> list[Any]:
    """The ``keep`` configs the model ranks fastest, fastest first: the ones worth compiling and timing
    (the first is the one to run without timing anything). Never empty for a non-empty list."""
    return [config for config, _ in rank_configs(configs, launch, gpu)[:max(1, keep)]]


def cheapest_tiling(options: Sequence[tuple[Any, Sequence[Any]]], launch_of: Callable[[Any], GemmLaunch],
                    gpu: GpuSpec) -> tuple[Any, Sequence[Any]]:
    """Of ``options``, ``(row tiling, its candidate configs)`` pairs (``configs.unspilled_tilings``),
    the one whose best config the model ranks fastest (``launch_of(tiling)``: the launch under that
    tiling); the earliest on a tie, so the launch policy's own tiling where it is as good."""
    if len(options) == 1:
        return options[0]

    def best_seconds(option: tuple[Any, Sequence[Any]]) -> float:
        launch = launch_of(option[0])  # once per tiling: building it counts the tiles' members
        return min(config_cost(config, launch, gpu).seconds for config in option[1])

    return min(options, key=best_seconds)
