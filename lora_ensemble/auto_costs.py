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
    from .kernels.gpu_specs import GpuSpec

__all__ = ["HEADLINE_SHAPES", "HOST_SECONDS", "BackendEstimate", "ShapeClass", "estimate_backend", "format_estimates",
           "rows_bucket"]

# Eager host time of one call through the library (validation, autograd node, launcher, launches),
# per backend and mode: "fwd" (a forward, with or without gradients recorded) and "fwd_bwd" (forward
# plus backward). The module rows of benchmarks/results/cpu-overhead.md (this 2-core CPU under load from
# other jobs: upper bounds; the device calls of triton and cuda stubbed), plus what the stubs leave out:
# Triton's binder and launch, ~15 µs per launch (research/gpu-readiness-3.md, N3: 10-20 µs, a guess),
# and the extension op's checks and cudaLaunchKernel, ~4 µs per launch (a guess); one launch forward,
# three forward + backward. The composite's CPU kernels stand in for its launches.
HOST_SECONDS: dict[str, dict[str, float]] = {
    "torch": {"fwd": 42e-6, "fwd_bwd": 195e-6},
    "triton": {"fwd": (81 + 15) * 1e-6, "fwd_bwd": (314 + 3 * 15) * 1e-6},
    "cuda": {"fwd": (31 + 4) * 1e-6, "fwd_bwd": (153 + 3 * 4) * 1e-6},
}
_CUBLAS_EFFICIENCY = 0.9
_TRITON_EFFICIENCY = 0.8
_WMMA_EFFICIENCY = {True: 0.4, False: 0.65}  # sm_90 and newer (no wgmma), Ampere / Ada
_FMA_EFFICIENCY = 0.7
# Skinny batched GEMMs (rank r columns) and elementwise passes: bandwidth-bound at this fraction of DRAM speed.
_PASS_EFFICIENCY = 0.8
_CUBLAS_TILES = tuple(SimpleNamespace(kwargs={"BLOCK_N": n, "BLOCK_K": 64}, num_warps=8, num_stages=4, rows=m)
                      for m in (64, 128) for n in (64, 128, 256))
_CUDA_BLOCK_M, _CUDA_BLOCK_N, _CUDA_GRAD_BLOCK_C, _CUDA_GRAD_BLOCK_ROWS = 64, 128, 128, 32
_MIN_ROWS_PER_SPLIT = 512  # both weight-gradient kernels split rows only above this many per range


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


def _precision(dtype: torch.dtype, backend: str) -> str:
    if dtype != torch.float32:
        return "16bit"
    if backend == "cuda":
        return "fp32"
    from .kernels.configs import dot_precision

    return dot_precision(dtype)


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


def _triton_configs(role: str, shape: ShapeClass, gpu: GpuSpec, block_m: int, block_r: int, cols: int, inner: int,
                    rows: int) -> list:
    from .kernels import configs

    dtype, precision = configs.DTYPE_NAMES[shape.dtype], _precision(shape.dtype, "triton")
    if role == "grads":
        return configs.fitting_lora_grads_configs(list(configs.LORA_GRADS_GPU_CONFIGS), rows=rows, cols=cols,
                                                  dtype=dtype, precision=precision, block_r=block_r,
                                                  shared_memory=gpu.shared_memory_per_program,
                                                  capability=gpu.capability)
    sum_members = {"stacked": None, "shared": False, "shared_dx": True}[role]
    candidates = configs.FUSED_LORA_GEMM_GPU_CONFIGS if sum_members is None else configs.SHARED_INPUT_GPU_CONFIGS
    return configs.fitting_fused_lora_gemm_configs(
        list(candidates), cols=cols, inner=inner, dtype=dtype, precision=precision, block_m=block_m,
        block_r=block_r, shared_memory=gpu.shared_memory_per_program, capability=gpu.capability,
        sum_members=sum_members, has_weight=shape.op == "linear")


def _grad_splits(n: int, m: int, d: int, k: int, cols_tile: int, quantum: int, gpu: GpuSpec) -> tuple[int, int]:
    """Row splits and rows per split of a weight-gradient launch (both backends' policy)."""
    splits = 1
    if not torch.are_deterministic_algorithms_enabled():
        programs = n * (_cdiv(d, cols_tile) + _cdiv(k, cols_tile))
        splits = max(1, min(_cdiv(2 * gpu.sm_count, programs), m // _MIN_ROWS_PER_SPLIT))
    per_split = _cdiv(_cdiv(max(m, 1), splits), quantum) * quantum
    return _cdiv(max(m, 1), per_split), per_split


def _fused(shape: ShapeClass, gpu: GpuSpec, backend: str) -> tuple[float, int]:
    """Device seconds and launches of the ``triton`` or ``cuda`` backend: forward, and with gradients
    the dx launch and the weight-gradient launch."""
    from .kernels.config_model import GemmLaunch, config_cost
    from .kernels.launch_policy import block_rank, shared_tiling, stacked_tiling

    n, m, d, k, r = shape.members, shape.rows, shape.d, shape.k, shape.rank
    e, rows = _element_size(shape.dtype), n * shape.rows
    weight = shape.op == "linear"
    precision = _precision(shape.dtype, backend)
    block_r = block_rank(r)
    tf32x3 = precision == "tf32x3"
    if backend == "cuda":
        efficiency = _FMA_EFFICIENCY if precision == "fp32" else _WMMA_EFFICIENCY[gpu.capability >= 90]
        cuda_tile = SimpleNamespace(kwargs={"BLOCK_N": _CUDA_BLOCK_N, "BLOCK_K": 32 if e == 2 else 16},
                                    num_warps=8, num_stages=3)
    else:
        efficiency = _TRITON_EFFICIENCY

    def launch(role: str, inner: int, cols: int, dram: int) -> float:
        shared_rows = role != "stacked"
        if backend == "cuda":
            block_m = _CUDA_BLOCK_M
        elif shared_rows:
            block_m = shared_tiling(m, cols, n, block_r, gpu.sm_count, tf32x3, role == "shared_dx").block_m
        else:
            block_m = stacked_tiling(m, n, block_r, tf32x3).block_m
        groups = 1
        if role == "shared":  # member groups while the output tiles leave SMs idle (member_groups_for)
            groups = max(1, min(n, gpu.sm_count // (_cdiv(m, 64) * _cdiv(cols, 128))))
        members_per_program = _cdiv(n, groups)
        plan = GemmLaunch(
            tile_rows=block_m, row_tiles=_cdiv(m, block_m) * (n if role == "stacked" else groups), cols=cols,
            inner=inner, precision=precision, lhs_bytes=e, rhs_bytes=e, dram_bytes=dram,
            column_operand=weight, rank_tile=block_r, rank_loops=0 if role == "stacked" else members_per_program,
            lhs_loads=n if role == "shared_dx" else 1, output_tiles=2 if role == "shared" else 1, expand=True,
            efficiency=efficiency)
        configs = [cuda_tile] if backend == "cuda" else _triton_configs(role, shape, gpu, block_m, block_r, cols,
                                                                        inner, m)
        return min(config_cost(c, plan, gpu).seconds for c in configs)

    x_rows = m if shape.shared else rows
    xa_bytes = 4 * rows * r
    factor_bytes = e * n * r * (d + k)
    base_bytes = 0 if weight else e * rows * k
    seconds = launch("shared" if shape.shared else "stacked", d, k,
                     e * (x_rows * d + (d * k if weight else 0) + rows * k + k) + factor_bytes + xa_bytes + base_bytes)
    launches = 1
    if shape.grad:
        # The CUDA shared-input dx runs one dy[n] W0 GEMM per member: as much work as the stacked dx.
        dx_role = "stacked" if not shape.shared or backend == "cuda" else "shared_dx"
        seconds += launch(dx_role, k, d, e * (rows * k + (d * k if weight else 0) + x_rows * d) + factor_bytes
                          + xa_bytes)
        cols_tile = _CUDA_GRAD_BLOCK_C if backend == "cuda" else 128
        splits, per_split = _grad_splits(n, m, d, k, cols_tile, 32 if backend == "cuda" else 16, gpu)
        grads = GemmLaunch(
            tile_rows=block_r, row_tiles=n * splits, cols=d + k, inner=per_split, precision=precision, lhs_bytes=4,
            rhs_bytes=e, dram_bytes=2 * xa_bytes + e * (x_rows * d + rows * k) + factor_bytes,
            dot_passes=2 if e == 2 else 1, efficiency=efficiency, col_tile="BLOCK_C", inner_tile="BLOCK_M")
        grad_configs = ([SimpleNamespace(kwargs={"BLOCK_C": _CUDA_GRAD_BLOCK_C, "BLOCK_M": _CUDA_GRAD_BLOCK_ROWS},
                                         num_warps=8, num_stages=3)] if backend == "cuda" else
                        _triton_configs("grads", shape, gpu, 0, block_r, max(d, k), 0, per_split))
        seconds += min(config_cost(c, grads, gpu).seconds for c in grad_configs)
        launches += 2
        if splits > 1 and e == 2:  # the fp32 sums cast to the dtype
            seconds += 2 * _pass(6 * n * r * (d + k) // 2, gpu)
            launches += 2
    return seconds, launches


def estimate_backend(backend: str, shape: ShapeClass, gpu: GpuSpec) -> BackendEstimate:
    """The modelled cost of ``backend`` (``"torch"``, ``"triton"`` or ``"cuda"``) for ``shape`` on ``gpu``."""
    if backend == "torch":
        device_s, kernels = _composite(shape, gpu)
    elif backend in ("triton", "cuda"):
        device_s, kernels = _fused(shape, gpu, backend)
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
