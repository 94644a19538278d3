"""Host time of Triton's C launch on a CPU: the part of a launch that ``benchmarks/device_stubs.py`` stubs.

Triton's CUDA launcher ends in a C function (triton 3.8: ``launchKernel`` of its ``driver.c``; 3.6: the
``launch`` of a module it generates per kernel signature) that parses the tuple of kernel arguments,
calls each tensor's ``data_ptr`` and checks it with ``cuPointerGetAttribute``, packs the parameters and
calls ``cuLaunchKernelEx``. Here that C code is built, with Triton's own build helper, against a
stand-in ``libcuda.so.1`` whose functions return success at once (generated from the CUDA header's
prototypes of the functions that C code names), and timed on the package's stacked forward kernel with
the arguments of a ViT-B/32 ``attn.qkv`` launch at batch 1 (16 members x 50 rows, 768 -> 2304, rank 8).
What it leaves out is the driver's own work in those calls (``cuLaunchKernelEx`` queues the launch;
the pointer queries), which only a GPU can time: the GPU pass measures whole launches.

Run as ``python -m benchmarks.triton_c_launch [--rounds N]`` on a machine without a CUDA device (with
one, the real ``libcuda.so.1`` is loaded and the stand-in would not be used) that has a C compiler;
triton 3.6 (a launcher generated per kernel signature) or 3.8 (``driver.c`` and a C signature).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import timeit
from dataclasses import dataclass

import torch
import triton

from lora_ensemble.backends import triton_interpreting

__all__ = ["CLaunch", "build_c_launch", "stand_in_libcuda_source", "unavailable_reason"]

# The launch timed: the stacked forward kernel's runtime arguments for this problem (bf16).
MEMBERS, ROWS, IN_FEATURES, OUT_FEATURES, RANK = 16, 50, 768, 2304, 8
_CASE = "forward-bf16-R16-M64-S4-aligned"


def _nvidia_driver_dir() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.dirname(nvidia.__file__)


def _c_compiler() -> str:
    """The C compiler Python was built with (its first word: ``CC`` may carry flags), else ``cc``."""
    return (sysconfig.get_config_var("CC") or "cc").split()[0]


def unavailable_reason() -> str | None:
    """Why the C launch cannot be timed here, or None."""
    if triton_interpreting():
        return "TRITON_INTERPRET=1: the kernels are Python functions, with no signature to launch"
    if torch.cuda.is_available():
        return ("a CUDA device is present: its libcuda.so.1 would be used, not the stand-in "
                "(the GPU pass times launches)")
    try:
        from triton.backends.nvidia import driver
    except ImportError:
        return f"triton {triton.__version__} has no NVIDIA backend"
    if not hasattr(driver, "make_launcher"):  # triton 3.6: a launcher generated per kernel signature
        with open(os.path.join(_nvidia_driver_dir(), "driver.c")) as f:
            if "build_signature_metadata" not in f.read():  # triton 3.8: driver.c with a C signature
                return f"triton {triton.__version__}'s launcher is neither the 3.6 kind nor the 3.8 kind"
    if subprocess.run([_c_compiler(), "--version"], capture_output=True).returncode != 0:
        return f"no C compiler ({_c_compiler()})"
    return None


def stand_in_libcuda_source(driver_source: str, cuda_header: str) -> str:
    """C source of a ``libcuda.so.1`` defining every CUDA driver function ``driver_source`` names, as
    ``cuda_header`` declares it, returning ``CUDA_SUCCESS`` at once: ``cuCtxGetCurrent`` reports a
    current context, and ``cuLaunchKernelEx`` counts its calls in ``stand_in_launches``."""
    names = sorted(set(re.findall(r"\bcu[A-Z]\w*", driver_source)))  # called, or looked up with dlsym
    bodies = {"cuCtxGetCurrent": "*pctx = (CUcontext)(uintptr_t)1;", "cuGetErrorString": '*pStr = "stand-in";',
              "cuLaunchKernelEx": "++stand_in_launches;"}
    lines = ["#include <cuda.h>", "#include <stdint.h>", "long long stand_in_launches = 0;"]
    for name in names:
        declared = re.search(r"CUresult\s+CUDAAPI\s+" + name + r"\s*\(([^;]*?)\)\s*;", cuda_header, re.S)
        if declared is not None:
            parameters = " ".join(declared.group(1).split())
            lines.append(f"CUresult CUDAAPI {name}({parameters}) {{ {bodies.get(name, '')} return CUDA_SUCCESS; }}")
    return "\n".join(lines) + "\n"


@dataclass
class CLaunch:
    """Triton's C launcher built against the stand-in, with one launch's arguments ready."""

    launch: object
    stand_in: ctypes.CDLL
    arguments: tuple
    kernel_arguments: int
    kind: str  # which C launcher

    def __call__(self) -> None:
        self.launch(*self.arguments)

    @property
    def launches(self) -> int:
        """How many launches reached the stand-in's ``cuLaunchKernelEx``."""
        return ctypes.c_longlong.in_dll(self.stand_in, "stand_in_launches").value


def build_c_launch(folder: str) -> CLaunch:
    """Build, in ``folder``, the stand-in ``libcuda.so.1`` and Triton's C launcher against it (triton
    3.8: ``driver.c``; 3.6: the launcher it generates per kernel signature), and the arguments of the
    timed launch: the stacked forward as the package launches it (AOT signature of :data:`_CASE`, its
    constexprs in place, CPU tensors for the pointers). A process loads one stand-in: call once."""
    from triton.backends.nvidia import driver
    from triton.runtime import build

    from lora_ensemble.kernels import aot, configs

    case = next(c for c in aot.aot_cases(90) if c.label() == _CASE)
    source = aot._source(case)
    per_signature = hasattr(driver, "make_launcher")
    if per_signature:
        launcher = driver.make_launcher(source.constants, dict(source.signature), None)
    else:
        with open(os.path.join(_nvidia_driver_dir(), "driver.c")) as f:
            launcher = f.read()
    include = os.path.join(_nvidia_driver_dir(), "include")
    with open(os.path.join(include, "cuda.h")) as h:
        stand_in_source = stand_in_libcuda_source(launcher, h.read())
    with open(os.path.join(folder, "libcuda.c"), "w") as f:
        f.write(stand_in_source)
    library = os.path.join(folder, "libcuda.so.1")
    subprocess.run([_c_compiler(), "-shared", "-fPIC", "-O2", f"-I{include}", "-Wl,-soname,libcuda.so.1", "-o",
                    library, os.path.join(folder, "libcuda.c")], check=True)
    stand_in = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)  # what the launcher module and its dlopen find
    linking = {"library_dirs": [folder], "include_dirs": driver.include_dirs, "libraries": ["libcuda.so.1"]}
    with triton.knobs.cache.scope():
        triton.knobs.cache.dir = folder  # the build stays out of Triton's cache
        if per_signature:
            module = build.compile_module_from_src(src=launcher, name="__triton_launcher", **linking)
        else:
            module = build.compile_module_from_file(src_path=os.path.join(_nvidia_driver_dir(), "driver.c"),
                                                    name="cuda_utils", **linking)
    values = _kernel_arguments(source)
    columns = case.config.kwargs["BLOCK_N"] * configs.column_group(case.config)
    grid = (-(-MEMBERS * ROWS // case.block_m) * -(-OUT_FEATURES // columns), 1, 1)
    packed_metadata = (case.config.num_warps, 1, 0)  # num_warps, num_ctas, shared memory
    if per_signature:  # grid, stream, function, cooperative, pdl, scratches, metadata, hooks, the arguments
        arguments = (*grid, 0, 0, False, False, None, None, packed_metadata, None, None, None, *values)
    else:  # ..., the metadata, hooks, scratches, the arguments' annotations and C signature, the arguments
        types = list(source.signature.values())
        annotations = [module.PyKernelArg(nested_tuple=None, type=module.ARG_CONSTEXPR if t == "constexpr"
                                          else module.ARG_KERNEL) for t in types]
        kernel_signature = module.build_signature_metadata([t for t in types if t != "constexpr"])
        arguments = (*grid, 0, 0, False, False, packed_metadata, None, None, None, None, None, annotations,
                     kernel_signature, values)
    kind = "the launch generated for the kernel's signature" if per_signature else "driver.c launchKernel"
    return CLaunch(module.launch, stand_in, arguments, len(values), kind)


def _kernel_arguments(source) -> list:
    """The stacked forward's arguments in order for the launch of the module docstring, constexprs included."""
    from lora_ensemble.kernels.fused_lora_gemm import _fused_lora_gemm_kernel

    bf16 = {"dtype": torch.bfloat16}
    tensors = {"in_ptr": torch.randn(MEMBERS, ROWS, IN_FEATURES, **bf16),
               "weight_ptr": torch.randn(OUT_FEATURES, IN_FEATURES, **bf16),
               "bias_ptr": torch.randn(OUT_FEATURES, **bf16),
               "base_ptr": None, "shrink_ptr": torch.randn(MEMBERS, RANK, IN_FEATURES, **bf16),
               "expand_ptr": torch.randn(MEMBERS, OUT_FEATURES, RANK, **bf16),
               "out_ptr": torch.empty(MEMBERS, ROWS, OUT_FEATURES, **bf16),
               "low_ptr": torch.empty(MEMBERS, ROWS, RANK)}
    names = _fused_lora_gemm_kernel.arg_names
    values = []
    for name, kind in source.signature.items():
        if name in tensors:
            values.append(tensors[name])
        elif kind == "constexpr":
            values.append(source.constants[(names.index(name),)])
        else:  # sizes and strides: any int of the kind (only parsed), the scaling a float
            values.append(1.0 if kind == "fp32" else 16)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"not measured: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        c_launch = build_c_launch(folder)
        c_launch()
        gc.disable()
        seconds = min(timeit.repeat(c_launch, number=args.calls, repeat=args.rounds)) / args.calls
        gc.enable()
        load = os.getloadavg()[0]
        print(f"triton {triton.__version__} C launch ({c_launch.kind}, a stand-in libcuda.so.1): "
              f"{seconds * 1e6:.2f} µs a launch, min of {args.rounds} rounds of {args.calls} "
              f"({c_launch.launches} launches reached cuLaunchKernelEx; 1-minute load {load:.2f}); "
              f"{c_launch.kernel_arguments} kernel arguments with the constexprs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
