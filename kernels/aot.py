# Ahead-of-time compilation of every Triton kernel of this package for an NVIDIA target (sm_90 by
# default) on a machine without a GPU: triton.compile(ASTSource(fn, signature, constexprs), target=
# GPUTarget("cuda", arch, 32)) runs the whole pipeline down to a cubin with ptxas. Each kernel is
# compiled in the argument specialisation it gets at run time for contiguous inputs (unit strides
# as constexpr 1, other strides and pointers 16-divisible), for each dtype (fp32 with TF32 and
# 3xTF32 dots) and a small and the largest rank tile, with the first autotune config the run-time
# pruning keeps for a large problem on the target (or with every config). The ptxas -v log of
# Triton's own compilation gives the registers and spills; the compiled kernel's metadata gives
# the shared memory.
"""Compile every kernel for a GPU target without a GPU; report registers, spills, shared memory.

Run as ``python -m lora_ensemble.kernels.aot [--arch 90]`` (``TRITON_INTERPRET`` must be unset:
the interpreter replaces the kernels by Python functions). Exit status 1 when a kernel fails to
compile or needs more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import (
    FUSED_MATMUL_GPU_CONFIGS,
    SHARED_ROWS_GPU_CONFIGS,
    WEIGHT_GRADS_GPU_CONFIGS,
    fitting_fused_matmul_configs,
    fitting_weight_grads_configs,
    fused_matmul_block_rows,
)
from .lowrank_matmul import _fused_lowrank_matmul_kernel, _fused_lowrank_matmul_shared_kernel
from .weight_grads import _lowrank_weight_grads_kernel

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
     {"HAS_BIAS": True, "SUM_MEMBERS": False}, SHARED_ROWS_GPU_CONFIGS),
    ("backward_dx", _fused_lowrank_matmul_kernel,
     {"stride_xk", "stride_wn", "stride_sr", "stride_ec", "stride_yc", "stride_pr"},
     {"HAS_BIAS": False}, FUSED_MATMUL_GPU_CONFIGS),
    ("backward_dx_shared", _fused_lowrank_matmul_shared_kernel,
     {"stride_xk", "stride_wn", "stride_sr", "stride_ec", "stride_yc", "stride_pr"},
     {"HAS_BIAS": False, "SUM_MEMBERS": True}, SHARED_ROWS_GPU_CONFIGS),
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
    precision: str  # the dots' input_precision: "tf32" or, for fp32, "tf32x3"
    block_r: int
    config: triton.Config

    def label(self) -> str:
        dtype = f"{self.dtype}-{self.precision}" if self.dtype == "fp32" else self.dtype
        return f"{self.name}-{dtype}-R{self.block_r}"


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

    def as_dict(self) -> dict:
        return {"case": self.case.label(), "config": self.config, "registers": self.registers,
                "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                "shared_bytes": self.shared_bytes, "shared_limit": self.shared_limit, "fits": self.fits}

    def line(self) -> str:
        flag = "" if self.fits else "  EXCEEDS SHARED MEMORY"
        return (f"{self.case.label():<40} {self.config:<44} regs {self.registers:>3}  "
                f"spills {self.spill_stores:>4}/{self.spill_loads:<4} smem {self.shared_bytes:>6}{flag}")


def _unwrap(kernel) -> triton.runtime.JITFunction:
    """The JIT function under the heuristics / autotune wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def candidate_configs(name: str, dtype: str, precision: str, block_r: int, arch: int = 90) -> list[triton.Config]:
    """The configs the run-time pruning keeps for kernel role ``name`` on a large problem
    (rows, d and k of 4096) on ``sm_<arch>``, in autotune order."""
    case = next(c for c in _CASES if c[0] == name)
    fixed, configs = case[3], list(case[4])
    shared_memory = SHARED_MEMORY_LIMIT.get(arch, min(SHARED_MEMORY_LIMIT.values()))
    tf32x3 = precision == "tf32x3"
    if case[1] is _lowrank_weight_grads_kernel:
        return fitting_weight_grads_configs(configs, rows=_LARGE_SIZE, cols=_LARGE_SIZE,
                                            element_size=_ELEMENT_SIZE[dtype], block_r=block_r,
                                            shared_memory=shared_memory, tf32x3=tf32x3)
    block_m = fused_matmul_block_rows({"M": _LARGE_SIZE, "BLOCK_R": block_r, "DOT_PRECISION": precision, **fixed})
    return fitting_fused_matmul_configs(configs, n_cols=_LARGE_SIZE, k_dim=_LARGE_SIZE,
                                        element_size=_ELEMENT_SIZE[dtype], block_m=block_m, block_r=block_r,
                                        shared_memory=shared_memory, sum_members=fixed.get("SUM_MEMBERS"),
                                        tf32x3=tf32x3)


def _source(case: AotCase) -> ASTSource:
    _, kernel, unit_strides, fixed, _ = next(c for c in _CASES if c[0] == case.name)
    fn = _unwrap(kernel)
    constexprs = {"BLOCK_R": case.block_r, "DOT_PRECISION": case.precision, **fixed, **case.config.kwargs}
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


def _ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the ``ptxas -v`` log."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_case(case: AotCase, arch: int = 90) -> AotReport:
    """Compile one case for ``sm_<arch>`` (no GPU needed) and report its resource usage, as the
    ``ptxas -v`` run of Triton's own compilation prints it."""
    config = case.config
    knobs = triton.knobs
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        compiled = triton.compile(_source(case), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    registers, spill_stores, spill_loads = _ptxas_usage(log.getvalue())
    config_text = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    config_text += f" w{config.num_warps} s{config.num_stages}"
    return AotReport(case, config_text, registers, spill_stores, spill_loads, compiled.metadata.shared,
                     SHARED_MEMORY_LIMIT.get(arch, min(SHARED_MEMORY_LIMIT.values())))


def aot_cases(arch: int = 90, all_configs: bool = False) -> list[AotCase]:
    """Every kernel role in fp32 (TF32 and 3xTF32 dots), fp16 and bf16 at rank tile 16,
    and in fp16 also at the largest rank tile (128), each with the first config the pruning keeps
    on ``sm_<arch>`` (every kept config with ``all_configs``)."""
    variants = (("fp32", "tf32", 16), ("fp32", "tf32x3", 16), ("fp16", "tf32", 16), ("bf16", "tf32", 16),
                ("fp16", "tf32", 128))
    cases = []
    for name, *_ in _CASES:
        for dtype, precision, block_r in variants:
            configs = candidate_configs(name, dtype, precision, block_r, arch)
            cases += [AotCase(name, dtype, precision, block_r, config)
                      for config in (configs if all_configs else configs[:1])]
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
    parser.add_argument("--json", metavar="PATH", help="also write the reports (and failures) to PATH as JSON")
    parser.add_argument("--only", metavar="TEXT", default="", help="compile only the cases whose label contains TEXT")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    work = [(case, args.arch) for case in aot_cases(args.arch, args.all_configs) if args.only in case.label()]
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r if isinstance(r, str) else r.as_dict() for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
