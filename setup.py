"""Build of lora_ensemble: the Python package, its Triton kernels, and the CUDA extension ``_C``.

``lora_ensemble._C`` (csrc/) is compiled when torch is a CUDA build (``torch.version.cuda``) and a
CUDA toolkit is found; whether a GPU is present never matters, so GPU-less builders compile it too.
Without a toolkit, or with ``LORA_ENSEMBLE_SKIP_CUDA_BUILD=1``, a pure-Python package is installed.
No network access and no device probing happen here.

Environment switches:
  LORA_ENSEMBLE_SKIP_CUDA_BUILD=1  build no extension (pure Python: torch and triton backends only)
  CUDA_HOME / CUDA_PATH            the CUDA toolkit (else found from nvcc on PATH, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST             GPU archs to compile for (default "8.0;9.0+PTX": Ampere, Hopper, PTX for newer)
  MAX_JOBS                         parallel compile jobs (ninja)
  LORA_ENSEMBLE_DEBUG=1            -O0 -g -lineinfo instead of -O3
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for Ampere (sm_80, also run by sm_86/sm_89) and Hopper (sm_90), plus compute_90 PTX that the
# driver JIT-compiles for any newer GPU (Blackwell and later) on first load.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_toolkit() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, the toolkit behind ``nvcc`` on PATH (resolving
    symlinks and wrapper scripts that ``exec`` the real nvcc), then /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: look for the nvcc it runs
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _is_toolkit(c)), None)


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("LORA_ENSEMBLE_SKIP_CUDA_BUILD", "0") == "1":
        print("lora_ensemble: LORA_ENSEMBLE_SKIP_CUDA_BUILD=1, installing pure Python (torch and triton backends)")
        return [], {}
    try:
        import torch
    except ImportError:
        print("lora_ensemble: torch is not installed in the build environment (use --no-build-isolation); "
              "installing pure Python (torch and triton backends)")
        return [], {}
    toolkit = find_cuda_toolkit()
    if torch.version.cuda is None or toolkit is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found"
        print(f"lora_ensemble: {why}, so the CUDA extension is not built; installing pure Python "
              "(torch and triton backends)")
        return [], {}
    os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    debug = os.environ.get("LORA_ENSEMBLE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The arch list joined by "_" (no character a shell would reinterpret, nor nvcc, which splits
    # option values at commas), for cuda_build_archs().
    archs = "-DLORA_ENSEMBLE_CUDA_ARCHS=" + "_".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
    nvcc_flags = opt + ["-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr", archs]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    print(f"lora_ensemble: building the CUDA extension with the toolkit at {toolkit} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (torch CUDA {torch.version.cuda})")
    ext = CUDAExtension(
        "lora_ensemble._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": opt, "nvcc": nvcc_flags},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(
    # lora_ensemble/kernels is a link to the top-level kernels/ folder, which has no __init__.py: it is a
    # namespace subpackage reached only as lora_ensemble.kernels (editable, wheel and source tree alike),
    # so `import kernels` from the repository root still finds Hugging Face's `kernels` when installed.
    packages=["lora_ensemble", "lora_ensemble.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
