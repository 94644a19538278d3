# Ahead-of-time compilation of every Triton kernel of this package for an NVIDIA target (sm_90 by
# default) on a machine without a GPU: triton.compile(ASTSource(fn, signature, constexprs), target=
# GPUTarget("cuda", arch, 32)) runs the whole pipeline down to a cubin with ptxas. Each kernel is
# compiled in the argument specialisation it gets at run time for contiguous inputs (unit strides
# as constexpr 1, other strides and pointers 16-divisible), for each dtype and a small and the
# largest rank tile, with the first autotune config the run-time pruning keeps for a large problem
# on the target (or with every config). ptxas -v on the PTX gives the registers and spills; the
# compiled kernel's metadata gives the shared memory.
"""Compile every kernel for a GPU target without a GPU; report registers, spills, shared memory.

Run as ``python -m lora_ensemble.kernels.aot [--arch 90]`` (``TRITON_INTERPRET`` must be unset:
the interpreter replaces the kernels by Python functions). Exit status 1 when a kernel fails to
compile or needs more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import (
    FUSED_MATMUL_GPU_CONFIGS,
    WEIGHT_GRADS_GPU_CONFIGS,
    fitting_fused_matmul_configs,
    fitting_weight_grads_configs,
    fused_matmul_block_rows,
    fused_matmul_output_tiles,
)
from .lowrank_matmul import _fused_lowrank_matmul_kernel, _fused_lowrank_matmul_shared_kernel
from .lowrank_weight_grads import _lowrank_weight_grads_kernel

__all__ = ["AotCase", "AotReport", "aot_cases", "candidate_configs", "compile_case", "main"]

# Largest dynamic shared memory per block (bytes) an NVIDIA architecture grants.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TRITON_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# Integer arguments that are not strides (sizes, counts).
_SIZE_ARGS = {"M", "N_COLS", "K_DIM", "RANK", "NUM_MEMBERS", "COLS_A", "COLS_B", "rows_per_split"}
_FP32_POINTERS = {"p_ptr", "pa_ptr", "pb_ptr"}
_ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
# The problem the configs are pruned for: large enough that no tile is cut down by the shape.
_LARGE_SIZE = 4096

# (case name, kernel, strides equal to 1 for contiguous inputs, fixed constexprs, config list)
_CASES = (
    ("forward", _fused_lowrank_matmul_kernel,
     {"stride_xk", "stride_wk", "stride_sk", "stride_er", "stride_yc", "stride_pr"},
     {"HAS_BIAS": True}, FUSED_MATMUL_GPU_CONFIGS),
    ("forward_shared", _fused_lowrank_matmul_shared_kernel,
     {"stride_xk", "stride_wk", "stride_sk", "stride_er", "stride_yc", "stride_pr"},
     {"HAS_BIAS": True, "SUM_MEMBERS": False}, FUSED_MATMUL_GPU_CONFIGS),
    ("backward_dx", _fused_lowrank_matmul_kernel,
     {"stride_xk", "stride_wn", "stride_sr", "stride_ec", "stride_yc", "stride_pr"},
     {"HAS_BIAS": False}, FUSED_MATMUL_GPU_CONFIGS),
    ("backward_dx_shared", _fused_lowrank_matmul_shared_kernel,
     {"stride_xk", "stride_wn", "stride_sr", "stride_ec", "stride_yc", "stride_pr"},
     {"HAS_BIAS": False, "SUM_MEMBERS": True}, FUSED_MATMUL_GPU_CONFIGS),
    ("backward_lora", _lowrank_weight_grads_kernel,
     {"stride_pa_r", "stride_za_c", "stride_ga_c", "stride_pb_r", "stride_zb_c", "stride_gb_r"},
     {"ATOMIC": False}, WEIGHT_GRADS_GPU_CONFIGS),
    ("backward_lora_split", _lowrank_weight_grads_kernel,
     {"stride_pa_r", "stride_za_c", "stride_ga_c", "stride_pb_r", "stride_zb_c", "stride_gb_r"},
     {"ATOMIC": True}, WEIGHT_GRADS_GPU_CONFIGS),
)


@dataclass(frozen=True)
class AotCase:
    """One compilation: a kernel role, its dtype, rank tile and launch config."""

    name: str
    dtype: str
    block_r: int
    config: triton.Config

    def label(self) -> str:
        return f"{self.name}-{self.dtype}-R{self.block_r}"


@dataclass(frozen=True)
class AotReport:
    """What ptxas and the compiler report for one :class:`AotCase`."""

    case: AotCase
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    def line(self) -> str:
        flag = "" if self.fits else "  EXCEEDS SHARED MEMORY"
        return (f"{self.case.label():<40} {self.config:<44} regs {self.registers:>3}  "
                f"spills {self.spill_stores:>4}/{self.spill_loads:<4} smem {self.shared_bytes:>6}{flag}")


def _unwrap(kernel) -> triton.runtime.JITFunction:
    """The JIT function under the heuristics / autotune wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def candidate_configs(name: str, dtype: str, block_r: int, arch: int = 90) -> list[triton.Config]:
    """The configs the run-time pruning keeps for kernel role ``name`` on a large problem
    (rows, d and k of 4096) on ``sm_<arch>``, in autotune order."""
    case = next(c for c in _CASES if c[0] == name)
    fixed, configs = case[3], list(case[4])
    shared_memory = SHARED_MEMORY_LIMIT.get(arch, min(SHARED_MEMORY_LIMIT.values()))
    if case[1] is _lowrank_weight_grads_kernel:
        return fitting_weight_grads_configs(configs, rows=_LARGE_SIZE, cols=_LARGE_SIZE,
                                            element_size=_ELEMENT_SIZE[dtype], block_r=block_r,
                                            shared_memory=shared_memory)
    block_m = fused_matmul_block_rows({"M": _LARGE_SIZE, "BLOCK_R": block_r, **fixed})
    return fitting_fused_matmul_configs(configs, n_cols=_LARGE_SIZE, k_dim=_LARGE_SIZE,
                                        element_size=_ELEMENT_SIZE[dtype], block_m=block_m, block_r=block_r,
                                        output_tiles=fused_matmul_output_tiles(fixed), shared_memory=shared_memory)


def _source(case: AotCase) -> ASTSource:
    _, kernel, unit_strides, fixed, _ = next(c for c in _CASES if c[0] == case.name)
    fn = _unwrap(kernel)
    constexprs = {"BLOCK_R": case.block_r, **fixed, **case.config.kwargs}
    if "BLOCK_M" not in constexprs:  # the fused matmul heuristic, for a large problem
        constexprs["BLOCK_M"] = fused_matmul_block_rows({"M": _LARGE_SIZE, **constexprs})
    dtype = _TRITON_DTYPE[case.dtype]
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            atomic_out = fixed.get("ATOMIC") and arg in ("ga_ptr", "gb_ptr")
            signature[arg] = "*fp32" if (arg in _FP32_POINTERS or atomic_out) else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg == "scaling":
            signature[arg] = "fp32"
        elif arg.startswith("stride_") or arg in _SIZE_ARGS:
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{case.name}: no AOT signature rule for argument {arg!r} of {fn.__name__}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    ptxas = triton.knobs.nvidia.ptxas.path
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                             check=True, capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_case(case: AotCase, arch: int = 90) -> AotReport:
    """Compile one case for ``sm_<arch>`` (no GPU needed) and report its resource usage."""
    config = case.config
    compiled = triton.compile(_source(case), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    registers, spill_stores, spill_loads = _ptxas_usage(compiled.asm["ptx"], arch)
    config_text = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    config_text += f" w{config.num_warps} s{config.num_stages}"
    return AotReport(case, config_text, registers, spill_stores, spill_loads, compiled.metadata.shared,
                     SHARED_MEMORY_LIMIT.get(arch, min(SHARED_MEMORY_LIMIT.values())))


def aot_cases(arch: int = 90, all_configs: bool = False) -> list[AotCase]:
    """Every kernel role in every dtype at rank tile 16, and in fp16 also at the largest rank tile
    (128), each with the first config the pruning keeps on ``sm_<arch>`` (every kept config with
    ``all_configs``)."""
    cases = []
    for name, *_ in _CASES:
        for dtype, block_r in (("fp32", 16), ("fp16", 16), ("bf16", 16), ("fp16", 128)):
            configs = candidate_configs(name, dtype, block_r, arch)
            cases += [AotCase(name, dtype, block_r, config) for config in (configs if all_configs else configs[:1])]
    return cases


def _compile_in_worker(args: tuple[AotCase, int]) -> AotReport | str:
    case, arch = args
    try:
        return compile_case(case, arch)
    except Exception as exc:  # reported per case, the run goes on
        return f"{case.label()}: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90)")
    parser.add_argument("--all-configs", action="store_true", help="compile every config the pruning keeps")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    work = [(case, args.arch) for case in aot_cases(args.arch, args.all_configs)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_compile_in_worker, work))
    failed = 0
    for result in results:
        if isinstance(result, str):
            print(f"FAILED {result}")
            failed += 1
        else:
            print(result.line())
            failed += not result.fits
    print(f"sm_{args.arch}: {len(results) - failed}/{len(results)} kernels compiled and fit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
