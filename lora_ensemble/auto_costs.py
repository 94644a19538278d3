"""What each backend costs for one shape class on one GPU, by model: ``auto``'s choice before any
measurement (and its only guide where it may not measure: with the pin switch, under deterministic
algorithms, while ``torch.compile`` traces, during CUDA-graph capture).

A call costs ``max(host, device)`` in eager mode (the host queues kernels ahead of the GPU, so a layer
is bound by the slower of the two) and the device time alone under CUDA graphs. Device time is a
sum over the backend's kernels, each estimated by :func:`lora_ensemble.kernels.config_model.config_cost`:

* ``torch`` (the composite): cuBLAS for the base GEMM (the best of a few large tiles at 90% of the
  dense peak), then the batched rank-``r`` GEMMs, the fp32 cast of ``xa`` and the epilogue
  ``baddbmm`` as memory-bound passes; the backward's nine or so kernels likewise.
* ``triton``: the fused forward, the fused dx and the weight-gradient launch with the tiles the
  launchers pick (``kernels/configs.py``) and the best config the pruning keeps, at 80% of the peak.
* ``cuda``: the same launches with the extension's fixed tiles (64 x 128 x 32, 8 warps, 3 stages;
  WMMA, at 40% of the peak on sm_90 (no wgmma) and 65% below; fp32 runs exact FMAs).

Host time is a table per backend and mode (:data:`HOST_SECONDS`), from ``benchmarks/bench_overhead.py``'s
stubbed runs on a CPU. Every number here is an estimate; measured times, where ``auto`` has them, decide.
(:mod:`lora_ensemble.kernels` is imported on the first estimate, not with this module.)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .kernels.config_model import GemmLaunch
    from .kernels.gpu_specs import GpuSpec

__all__ = ["HEADLINE_SHAPES", "HOST_SECONDS", "BackendEstimate", "ShapeClass", "estimate_backend", "format_estimates",
           "rows_bucket"]

# Eager host time of one call through the library (validation, autograd node, launcher, launches),
# per backend and mode: "fwd" (a forward, with or without gradients recorded) and "fwd_bwd" (forward
# plus backward). The module rows of a run of `python -m benchmarks.bench_overhead --stub-devices`
# (2026-12-06 15:19 UTC; the committed run of benchmarks/results/cpu-overhead.md, 15:42, is within 1 µs
# of it) on a 2-core CPU shared with other jobs (upper bounds; the device calls of triton and cuda
# stubbed), plus what the stubs leave out: Triton's C launch, ~5 µs per launch (its own part, argument
# parsing and each tensor's data_ptr, measured at 1.2-1.3 µs by benchmarks/triton_c_launch.py against a
# stand-in driver; the driver's cuLaunchKernelEx and pointer queries a guess), and the extension op's
# checks and cudaLaunchKernel, ~4 µs per launch (a guess); one launch forward, three forward + backward. The
# composite's CPU kernels stand in for its launches.
HOST_SECONDS: dict[str, dict[str, float]] = {
    "torch": {"fwd": 36e-6, "fwd_bwd": 181e-6},
    "triton": {"fwd": (29 + 5) * 1e-6, "fwd_bwd": (148 + 3 * 5) * 1e-6},
    "cuda": {"fwd": (29 + 4) * 1e-6, "fwd_bwd": (152 + 3 * 4) * 1e-6},
}
_CUBLAS_EFFICIENCY = 0.9
_WMMA_EFFICIENCY = {True: 0.31, False: 0.65}  # sm_90 and newer (WMMA, no wgmma: ~330 TFLOP/s on an H100), Ampere / Ada
_FMA_EFFICIENCY = 0.7
# Skinny batched GEMMs (rank r columns) and elementwise passes: bandwidth-bound at this fraction of DRAM speed.
_PASS_EFFICIENCY = 0.8
_CUBLAS_TILES = tuple(SimpleNamespace(kwargs={"BLOCK_N": n, "BLOCK_K": 64}, num_warps=8, num_stages=4, rows=m)
                      for m in (64, 128) for n in (64, 128, 256))
_CUDA_BLOCK_N, _CUDA_GRAD_BLOCK_C, _CUDA_GRAD_BLOCK_ROWS = 128, 128, 32
_GRAD_BLOCK_COLS = 128  # the column tile both weight-gradient launchers count their programs with


def rows_bucket(rows: int) -> int:
    """The power of two at or above ``rows`` (at least 1): the rows-per-member part of a shape class."""
    return 1 << max(rows - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShapeClass:
    """Calls that ``auto`` treats alike: the op (``"linear"``, or ``"delta"`` over a given base output),
    the dtype, ``N`` members, rows per member rounded up to a power of two, ``d``, ``k``, the rank,
    shared or stacked input, and whether gradients are recorded."""

    op: str
    dtype: torch.dtype
    members: int
    rows: int
    d: int
    k: int
    rank: int
    shared: bool
    grad: bool

    def key(self) -> str:
        """A stable text key, e.g. ``linear bfloat16 N16 M64 d768 k768 r8 stacked fwd_bwd``."""
        return (f"{self.op} {str(self.dtype).removeprefix('torch.')} N{self.members} M{self.rows} d{self.d} "
                f"k{self.k} r{self.rank} {'shared' if self.shared else 'stacked'} "
                f"{'fwd_bwd' if self.grad else 'fwd'}")


@dataclass(frozen=True)
class BackendEstimate:
    """One backend's modelled cost for a shape class: device and host seconds, kernels launched."""

    backend: str
    device_s: float
    host_s: float
    kernels: int

    @property
    def eager_s(self) -> float:
        """Seconds per eager call: the slower of the host and the device."""
        return max(self.device_s, self.host_s)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cuda_precision(dtype: torch.dtype) -> str:
    """The config model's dot rate of the CUDA kernels: 16-bit tensor-core dots, or fp32 FMA."""
    return "16bit" if dtype != torch.float32 else "fp32"


def _cublas_gemm(rows: int, inner: int, cols: int, e: int, gpu: GpuSpec, dtype: torch.dtype) -> float:
    """A cuBLAS GEMM ``[rows, inner] @ [inner, cols]``: the best of a few large tiles."""
    from .kernels.config_model import GemmLaunch, config_cost

    precision = "16bit" if dtype != torch.float32 else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    dram = e * (rows * inner + inner * cols + rows * cols)
    return min(config_cost(tile, GemmLaunch(tile.rows, _cdiv(rows, tile.rows), cols, inner, precision, e, e, dram,
                                            efficiency=_CUBLAS_EFFICIENCY), gpu).seconds
               for tile in _CUBLAS_TILES)


def _pass(nbytes: int, gpu: GpuSpec) -> float:
    """A bandwidth-bound kernel moving ``nbytes`` (a skinny batched GEMM, a cast, a scale)."""
    from .kernels.config_model import KERNEL_OVERHEAD_S

    return nbytes / (gpu.dram_bytes_per_s * _PASS_EFFICIENCY) + KERNEL_OVERHEAD_S


def _composite(shape: ShapeClass, gpu: GpuSpec) -> tuple[float, int]:
    """Device seconds and kernels of the ``torch`` backend (``backend_torch.py``, kernel by kernel)."""
    n, m, d, k, r = shape.members, shape.rows, shape.d, shape.k, shape.rank
    e, rows = _element_size(shape.dtype), n * shape.rows
    base_rows = m if shape.shared else rows
    low_cast = shape.dtype != torch.float32  # xa and dyb are cast to and from fp32 for 16-bit inputs
    kernels = []
    if shape.op == "linear":
        kernels.append(_cublas_gemm(base_rows, d, k, e, gpu, shape.dtype))        # F.linear
    kernels.append(_pass(e * (base_rows * d + n * r * d + rows * r), gpu))        # xa = x A^T
    kernels.append(_pass(e * (base_rows * k + rows * r + n * k * r + rows * k), gpu))  # baddbmm
    if low_cast:
        kernels.append(_pass((e + 4) * rows * r, gpu))                            # xa to fp32
    if shape.grad:
        kernels.append(_pass(e * (rows * k + n * k * r + rows * r), gpu))         # dyb = dy B
        if shape.op == "linear":
            kernels.append(_cublas_gemm(base_rows, k, d, e, gpu, shape.dtype))    # dy W0 (sum_n dy[n] W0)
            if shape.shared:
                kernels.append(_pass(e * (rows * k + m * k), gpu))               # sum_n dy[n]
        kernels.append(_pass(e * (rows * r + n * r * d + 2 * base_rows * d), gpu))  # + s (dy B) A
        kernels.append(_pass(e * (rows * r + base_rows * d + n * r * d), gpu))    # dA
        kernels.append(_pass(e * (rows * k + rows * r + n * k * r), gpu))         # dB
        kernels.append(_pass(4 * e * n * r * (d + k), gpu))                       # the two scalings
        if low_cast:
            kernels += [_pass((e + 4) * rows * r, gpu)] * 3                      # dyb to fp32 and back, xa back
    return sum(kernels), len(kernels)


def _best(configs: list, launch: GemmLaunch, gpu: GpuSpec) -> float:
    """Seconds of ``launch`` under the config the cost model ranks first (what a pinned launch runs
    and where tuning starts)."""
    from .kernels.config_model import config_cost

    return min(config_cost(c, launch, gpu).seconds for c in configs)


def _triton(shape: ShapeClass, gpu: GpuSpec) -> tuple[float, int]:
    """Device seconds and launches of the ``triton`` backend (kernels/fused_lora_gemm.py,
    kernels/lora_grads.py) as :mod:`lora_ensemble.kernels.launch_costs` describes them, each at the
    row tiling the launcher runs and under the best config the pruning keeps ("aligned" widths): the
    forward, and with gradients the dx launch and the weight-gradient launch (and, when its rows are
    split, the zeroing and the cast of dA and dB)."""
    from .kernels import configs, launch_costs
    from .kernels.fused_lora_gemm import fused_tiling
    from .kernels.launch_policy import block_rank, grad_row_splits, grad_rows_per_split

    n, m, d, k, r = shape.members, shape.rows, shape.d, shape.k, shape.rank
    e, weight, dtype = _element_size(shape.dtype), shape.op == "linear", configs.DTYPE_NAMES[shape.dtype]
    precision = configs.dot_precision(shape.dtype)  # what the kernels and the spill record name
    block_r = block_rank(r)

    def fused(inner: int, cols: int, sum_members: bool | None, has_base: bool) -> float:
        shared = sum_members is not None
        tiling, kept, launch = fused_tiling(
            list(configs.SHARED_INPUT_GPU_CONFIGS if shared else configs.FUSED_LORA_GEMM_GPU_CONFIGS), shared, m, n,
            inner, cols, r, shape.dtype, precision, gpu, gpu.sm_count, sum_members=bool(sum_members),
            has_weight=weight, has_base=has_base, split_k_configs=list(configs.FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS))
        # Split-K: the tiles' arrival counts zeroed by a launch of its own before the kernel.
        return _best(kept, launch, gpu) + (_pass(0, gpu) if tiling.k_splits > 1 else 0.0)

    seconds = fused(d, k, False if shape.shared else None, shape.op == "delta")
    launches = 1
    if shape.grad:
        seconds += fused(k, d, True if shape.shared else None, False)
        programs = n * (_cdiv(d, _GRAD_BLOCK_COLS) + _cdiv(k, _GRAD_BLOCK_COLS))
        splits = grad_row_splits(m, programs, gpu.sm_count, torch.are_deterministic_algorithms_enabled())
        per_split = grad_rows_per_split(m, splits)
        splits = _cdiv(max(m, 1), per_split)
        grads = launch_costs.lora_grads_launch(n, m, d, k, r, block_r, splits, per_split, precision, e, shape.shared)
        kept = configs.fitting_lora_grads_configs(list(configs.LORA_GRADS_GPU_CONFIGS), rows=per_split,
                                                  cols=max(d, k), dtype=dtype, precision=precision, block_r=block_r,
                                                  shared_memory=gpu.shared_memory_per_program,
                                                  capability=gpu.capability)
        seconds += _best(kept, grads, gpu)
        launches += 2
        if splits > 1:  # dA and dB zeroed in fp32 before, and cast to the dtype after
            seconds += 2 * _pass(4 * n * r * (d + k) // 2, gpu) + (2 * _pass(6 * n * r * (d + k) // 2, gpu)
                                                                    if e == 2 else 0)
            launches += 4 if e == 2 else 2
    return seconds, launches


def _cuda_stacked_plan(members: int, rows: int, inner: int, rank_pad: int, cols: int, e: int,
                       gpu: GpuSpec) -> tuple[int, int, int, int, int]:
    """``(block_rows, tile_rows, row_tiles, k_splits, k_per_split)`` of a stacked CUDA fused launch, as
    ``csrc/cuda/make_params.cuh`` plans it with ``csrc/cuda/launch_policy.cuh`` (16- or 64-row tiles
    spanning members while their shrink slices fit, else whole members; split-K while the CTAs fill
    less than the SMs) and the tile shapes of ``csrc/cuda/fused_tile.cuh`` (members per tile: 16 at
    16 rows up to rank tile 32, 8 at 64, 4 at 128; 4 at 64 rows up to rank tile 32, else 2)."""
    from .kernels.launch_policy import row_tile_members

    small_members = 16 if rank_pad <= 32 else (8 if rank_pad == 64 else 4)
    large_members = 4 if rank_pad <= 32 else 2
    block_rows = 64 if row_tile_members(rows, 64, members) <= large_members else 16
    tile_members = large_members if block_rows == 64 else small_members
    tile_rows = block_rows
    if row_tile_members(rows, block_rows, members) > tile_members:
        tile_rows = max(1, min(tile_members, block_rows // max(rows, 1))) * rows
    row_tiles = _cdiv(members * rows, tile_rows)
    block_k = 32 if e == 2 else 16
    programs = row_tiles * _cdiv(cols, _CUDA_BLOCK_N)
    splits = min(gpu.sm_count // max(programs, 1), inner // 128, 16)
    per_split = inner
    if splits > 1:
        per_split = _cdiv(_cdiv(inner, splits), block_k) * block_k
        splits = _cdiv(inner, per_split)
    return block_rows, tile_rows, row_tiles, max(splits, 1), per_split


def _cuda(shape: ShapeClass, gpu: GpuSpec) -> tuple[float, int]:
    """Device seconds and launches of the ``cuda`` backend (csrc/cuda): the fused forward and dx with
    the extension's fixed tiles (BM 16 or 64 x BN 128, 8 warps, 3 stages; WMMA tensor cores for 16-bit
    inputs, exact fp32 FMAs for fp32) and its split-K, and the weight-gradient launch (128-column,
    32-row tiles)."""
    from .kernels import launch_costs
    from .kernels.config_model import GemmLaunch, config_cost
    from .kernels.launch_policy import RowTiling, block_rank, grad_row_splits

    n, m, d, k, r = shape.members, shape.rows, shape.d, shape.k, shape.rank
    e, weight = _element_size(shape.dtype), shape.op == "linear"
    precision = _cuda_precision(shape.dtype)
    efficiency = _FMA_EFFICIENCY if precision == "fp32" else _WMMA_EFFICIENCY[gpu.capability >= 90]
    rank_pad = block_rank(r)

    def fused(inner: int, cols: int, dx: bool) -> float:
        tile = SimpleNamespace(kwargs={"BLOCK_N": _CUDA_BLOCK_N, "BLOCK_K": 32 if e == 2 else 16}, num_warps=8,
                               num_stages=3)
        if shape.shared:  # one pass of every member per CTA at 16 rows, member groups / passes otherwise
            block_rows = 16 if m < 64 or _cdiv(m, 64) * _cdiv(cols, _CUDA_BLOCK_N) < gpu.sm_count else 64
            row_tiles, held, splits, per_split = _cdiv(m, block_rows), n, 1, inner
            programs = row_tiles * _cdiv(cols, _CUDA_BLOCK_N)
            wanted = min(gpu.sm_count // max(programs, 1), inner // 128, 16)
            if wanted > 1:
                per_split = _cdiv(_cdiv(inner, wanted), tile.kwargs["BLOCK_K"]) * tile.kwargs["BLOCK_K"]
                splits = _cdiv(inner, per_split)
            pairs = n * block_rows // 16
            in_rows, out_rows = (n * m, m) if dx else (m, n * m)
        else:
            block_rows, tile_rows, row_tiles, splits, per_split = _cuda_stacked_plan(n, m, inner, rank_pad, cols, e,
                                                                                      gpu)
            _, held_total, _ = launch_costs.stacked_tile_members(n, m, RowTiling(tile_rows, 1, False))
            held = held_total / row_tiles
            pairs = held if block_rows == 16 else min(block_rows // 16 + held - 1, 4 * held)
            in_rows = out_rows = n * m
        dram = (e * (in_rows * inner + (inner * cols if weight else 0) + n * r * (inner + cols) + out_rows * cols)
                + 4 * n * m * r)
        launch = GemmLaunch(
            tile_rows=block_rows, row_tiles=row_tiles * splits, cols=cols, inner=per_split, precision=precision,
            lhs_bytes=e, rhs_bytes=e, dram_bytes=dram, column_operand=weight,
            rank_tile=round(pairs * rank_pad * 16 / block_rows), lhs_loads=n if (shape.shared and dx) else 1,
            expands=held, expand_rank=rank_pad, expand_passes=2 if e == 2 else 1, efficiency=efficiency)
        seconds = config_cost(tile, launch, gpu).seconds
        if splits > 1:  # the fp32 partials of every range, written and summed by the last CTA of a tile, and
            seconds += _pass(2 * 4 * splits * out_rows * cols, gpu)  # the arrival counts zeroed before (a launch)
        return seconds

    seconds = fused(d, k, False)
    launches = 1
    if shape.grad:
        seconds += fused(k, d, True)
        programs = n * (_cdiv(d, _CUDA_GRAD_BLOCK_C) + _cdiv(k, _CUDA_GRAD_BLOCK_C))
        splits = grad_row_splits(m, programs, gpu.sm_count, torch.are_deterministic_algorithms_enabled())
        per_split = _cdiv(_cdiv(max(m, 1), splits), _CUDA_GRAD_BLOCK_ROWS) * _CUDA_GRAD_BLOCK_ROWS  # its row quantum
        splits = _cdiv(max(m, 1), per_split)
        grads = launch_costs.lora_grads_launch(n, m, d, k, r, rank_pad, splits, per_split, precision, e, shape.shared,
                                               efficiency)
        tile = SimpleNamespace(kwargs={"BLOCK_C": _CUDA_GRAD_BLOCK_C, "BLOCK_M": _CUDA_GRAD_BLOCK_ROWS}, num_warps=8,
                               num_stages=3)
        seconds += config_cost(tile, grads, gpu).seconds
        launches += 2
        if splits > 1 and e == 2:  # the fp32 sums cast to the dtype
            seconds += 2 * _pass(6 * n * r * (d + k) // 2, gpu)
            launches += 2
    return seconds, launches


def estimate_backend(backend: str, shape: ShapeClass, gpu: GpuSpec) -> BackendEstimate:
    """The modelled cost of ``backend`` (``"torch"``, ``"triton"`` or ``"cuda"``) for ``shape`` on ``gpu``."""
    if backend == "torch":
        device_s, kernels = _composite(shape, gpu)
    elif backend == "triton":
        device_s, kernels = _triton(shape, gpu)
    elif backend == "cuda":
        device_s, kernels = _cuda(shape, gpu)
    else:
        raise ValueError(f"backend: no cost model for {backend!r}; choose one of 'torch', 'triton', 'cuda'")
    host_s = HOST_SECONDS[backend]["fwd_bwd" if shape.grad else "fwd"]
    return BackendEstimate(backend, device_s, host_s, kernels)


# The headline shapes of the GPU pass (research/gpu-readiness-3.md, section 3), bf16.
HEADLINE_SHAPES: tuple[tuple[str, ShapeClass], ...] = tuple(
    (label, ShapeClass("linear", torch.bfloat16, n, m, d, k, r, shared, grad))
    for label, n, m, d, k, r, shared, grad in (
        ("ViT-B/32 batch 32, training", 16, 1600, 768, 768, 8, False, True),
        ("ViT-B/32 batch 32, inference", 16, 1600, 768, 768, 8, False, False),
        ("ViT-B/32 batch 1", 16, 50, 768, 768, 8, False, False),
        ("ViT-B/32 batch 1, shared input", 16, 50, 768, 768, 8, True, False),
        ("Llama-7B q_proj decode", 16, 1, 4096, 4096, 16, False, False),
        ("Llama-7B q_proj decode, 16 rows", 16, 16, 4096, 4096, 16, False, False),
        ("Llama-7B q_proj prefill", 16, 512, 4096, 4096, 16, False, False),
    ))


def format_estimates(gpu: GpuSpec, shapes: tuple[tuple[str, ShapeClass], ...] = HEADLINE_SHAPES) -> str:
    """A markdown table of every backend's modelled device and eager µs on ``gpu`` for ``shapes``, and
    what ``auto`` picks by the model in eager mode and under a compiled graph."""
    backends = ("torch", "triton", "cuda")
    lines = [f"Modelled on {gpu.name} (sm_{gpu.capability}, {gpu.sm_count} SMs); µs per call, device / eager "
             "(eager = max(host, device))", "",
             "| shape | " + " | ".join(backends) + " | auto, eager | auto, compiled |",
             "|---|" + "---:|" * len(backends) + "---|---|"]
    for label, shape in shapes:
        estimates = {b: estimate_backend(b, shape, gpu) for b in backends}
        cells = [f"{e.device_s * 1e6:.1f} / {e.eager_s * 1e6:.1f}" for e in estimates.values()]
        eager = min(backends, key=lambda b: estimates[b].eager_s)
        compiled = min(backends, key=lambda b: estimates[b].device_s)
        lines.append(f"| {label} ({shape.key()}) | " + " | ".join(cells) + f" | {eager} | {compiled} |")
    return "\n".join(lines)
