"""The ``cuda`` backend (hand-written CUDA C++ kernels in csrc/cuda/).

Without a GPU: the compiled extension registers CUDA kernels for its three ops, their schemas and
fake impls pass ``opcheck`` on meta tensors, and importing the package neither loads the extension
nor initialises CUDA. The kernels' own source also runs on the CPU under a host emulation of the
CUDA features they use (csrc/cuda/host_emulation.cuh: a thread per CUDA thread, barriers, late
cp.async copies, WMMA tiles with their alignment rules), built with g++, against the float64
reference, with NaN guard zones around every buffer to catch reads and writes past the edges.
With a GPU (``@pytest.mark.gpu``): every output against the float64 reference
over odd shapes, both layouts, three dtypes and ranks 1..128, the by-products ``xa`` / ``dyb``,
input errors, and CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import lora_ensemble
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward

from .utils import TOLERANCES, assert_close_named, check_against_reference, make_inputs

OPS = ("cuda_forward", "cuda_backward_dx", "cuda_backward_lora")

_EXTENSION_EXPECTED = torch.version.cuda is not None and os.environ.get("LORA_ENSEMBLE_SKIP_CUDA_BUILD", "0") != "1"
needs_extension = pytest.mark.skipif(
    not _EXTENSION_EXPECTED, reason="the CUDA extension is not built (CPU torch or LORA_ENSEMBLE_SKIP_CUDA_BUILD=1)")


@pytest.fixture(scope="module")
def backend_cuda():
    import lora_ensemble.backend_cuda as module

    return module


@needs_extension
def test_ops_have_cuda_kernels(backend_cuda):
    assert backend_cuda.has_cuda_kernels()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ensemble::{op}", "CUDA"), op


def _default_arch_list() -> str:
    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    return re.search(r'^DEFAULT_ARCH_LIST = "([^"]+)"', setup_py, re.MULTILINE).group(1)


def test_default_build_carries_ptx_for_newer_gpus():
    """SASS runs only on its own major architecture: without PTX, a GPU newer than the last listed
    arch (Blackwell for an 8.0;9.0 build) has no kernel image at all. The default arch list embeds
    compute_90 PTX, which the driver compiles for any later GPU."""
    assert _default_arch_list().split(";")[-1].endswith("+PTX"), _default_arch_list()


@needs_extension
def test_build_records_its_archs(backend_cuda):
    """``build_archs()`` is the arch list the extension was compiled for (the default unless
    TORCH_CUDA_ARCH_LIST is set); with cuobjdump at hand, the binary holds PTX exactly when that
    list asks for it."""
    archs = backend_cuda.build_archs()
    assert archs and all(re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch) for arch in archs), archs
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert archs == _default_arch_list().split(";")
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-ptx", backend_cuda._C.__file__], capture_output=True,
                                 text=True, timeout=120)
        assert (".ptx" in listing.stdout) == any(arch.endswith("+PTX") for arch in archs), (archs, listing.stdout)


@pytest.mark.gpu
@needs_extension
def test_device_has_kernel_image(backend_cuda):
    """On the GPU at hand (sm_80 or later) the extension finds its kernels; the check is cached."""
    index = torch.cuda.current_device()
    assert backend_cuda.device_problem(index) is None
    assert "cuda" in lora_ensemble.available_backends(torch.device("cuda", index))


def _meta_args(op: str, shared_input: bool, with_bias: bool = True) -> tuple:
    n, m, d, k, r = 3, 7, 24, 10, 5
    t = lambda *s, dtype=torch.float16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    x = t(m, d) if shared_input else t(n, m, d)
    if op == "cuda_forward":
        return (x, t(k, d), t(k) if with_bias else None, None, t(n, r, d), t(n, k, r), 0.5, shared_input)
    if op == "cuda_backward_dx":
        return (t(n, m, k), t(k, d), t(n, r, d), t(n, k, r), 0.5, shared_input)
    return (t(n, m, k), x, t(n, m, r, dtype=torch.float32), t(n, m, r, dtype=torch.float32), 0.5, shared_input)


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_meta(backend_cuda, op, shared_input):
    args = _meta_args(op, shared_input)
    torch.library.opcheck(getattr(torch.ops.lora_ensemble, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
def test_fake_shapes(backend_cuda, shared_input):
    n, m, d, k, r = 3, 7, 24, 10, 5
    out, xa = torch.ops.lora_ensemble.cuda_forward(*_meta_args("cuda_forward", shared_input, with_bias=False))
    assert (out.shape, out.dtype, xa.shape, xa.dtype) == ((n, m, k), torch.float16, (n, m, r), torch.float32)
    dx, dyb = torch.ops.lora_ensemble.cuda_backward_dx(*_meta_args("cuda_backward_dx", shared_input))
    assert dx.shape == ((m, d) if shared_input else (n, m, d)) and dyb.shape == (n, m, r)
    assert dyb.dtype == torch.float32
    dA, dB = torch.ops.lora_ensemble.cuda_backward_lora(*_meta_args("cuda_backward_lora", shared_input))
    assert (dA.shape, dB.shape, dA.dtype, dB.dtype) == ((n, r, d), (n, k, r), torch.float16, torch.float16)


def test_import_loads_no_extension_and_no_cuda():
    code = (
        "import sys, torch, lora_ensemble\n"
        "print('lora_ensemble._C' in sys.modules, 'lora_ensemble.backend_cuda' in sys.modules, "
        "torch.cuda.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "False", "False"], result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The kernel source under host emulation (CPU only, g++ and the CUDA headers).

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
EMULATED = ("common.cuh", "params.cuh", "fused_lora_gemm.cuh", "lora_grads.cuh")
# (file, text in the kernel source, its host-emulation stand-in)
EMULATION_SWAPS = (
    ("common.cuh", "#include <mma.h>\n", ""),
    ("fused_lora_gemm.cuh", "#include <c10/cuda/CUDAException.h>\n", ""),
    ("lora_grads.cuh", "#include <c10/cuda/CUDAException.h>\n", ""),
    ("fused_lora_gemm.cuh", "extern __shared__ __align__(128) unsigned char smem[];",
     "unsigned char* smem = emu::shared_memory();"),
    ("lora_grads.cuh", "extern __shared__ __align__(128) unsigned char smem[];",
     "unsigned char* smem = emu::shared_memory();"),
    ("fused_lora_gemm.cuh", "kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);",
     "emu::launch(kernel, grid, Tile::kThreads, Tile::kSmemBytes, p);"),
    ("lora_grads.cuh", "kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);",
     "emu::launch(kernel, grid, Tile::kThreads, Tile::kSmemBytes, p);"),
)
# The entry points: the same parameter set-up as csrc/cuda/ops.cu, on host pointers.
EMULATION_SHIM = r"""
#include "fused_lora_gemm.cuh"
#include "lora_grads.cuh"
using namespace lora_ensemble;
static bool vec_ok(const void* p, long ld, int elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % (16 / elem) == 0;
}
template <class T>
static void fused(bool fwd, const void* in, const void* w, const void* bias, const void* shrink, const void* expand,
                  void* out, float* low, int n, int m, int inner, int cols, int r, float s, bool shared, int groups,
                  const void* base) {
  FusedLoraGemmParams<T> p{};
  p.in = (const T*)in; p.weight = (const T*)w; p.bias = (const T*)bias; p.base = (const T*)base;
  p.shrink = (const T*)shrink;
  p.expand = (const T*)expand; p.out = (T*)out; p.low = low;
  p.members = n; p.rows = m; p.inner = inner; p.cols = cols; p.rank = r; p.scaling = s; p.shared = shared;
  p.member_groups = groups; p.device = 0;
  p.out_sum = !fwd && shared && groups > 1 ? (float*)out : nullptr;  // then out is the zeroed fp32 sum
  const int d = fwd ? inner : cols;  // W0 [k, d]; forward: shrink A [r, d], expand B [k, r]; dx: shrink B, expand A
  p.vec_in = vec_ok(in, inner, sizeof(T)); p.vec_weight = w != nullptr && vec_ok(w, d, sizeof(T));
  p.vec_shrink = vec_ok(shrink, fwd ? d : r, sizeof(T)); p.vec_expand = vec_ok(expand, fwd ? r : d, sizeof(T));
  launch_fused_lora_gemm<T>(p, fwd, nullptr);
}
template <class T>
static void grads(const void* x, const void* dy, const float* xa, const float* dyb, void* ga, void* gb, int n, int m,
                  int d, int k, int r, float s, bool shared, int rows_per_split) {
  LoraGradParams<T> p{};
  const bool split = rows_per_split < m;  // then ga / gb are the zeroed fp32 sums
  p.x = (const T*)x; p.dy = (const T*)dy; p.xa = xa; p.dyb = dyb;
  p.grad_A = split ? nullptr : (T*)ga; p.grad_B = split ? nullptr : (T*)gb;
  p.grad_A_sum = split ? (float*)ga : nullptr; p.grad_B_sum = split ? (float*)gb : nullptr;
  p.members = n; p.rows = m; p.d = d; p.k = k; p.rank = r; p.rows_per_split = rows_per_split; p.scaling = s;
  p.shared = shared; p.device = 0;
  p.vec_x = vec_ok(x, d, sizeof(T)); p.vec_dy = vec_ok(dy, k, sizeof(T));
  p.vec_low = vec_ok(xa, r, 4) && vec_ok(dyb, r, 4);
  launch_lora_grads<T>(p, nullptr);
}
extern "C" const char* emu_fused(int dtype, int fwd, const void* in, const void* w, const void* bias,
                                 const void* shrink, const void* expand, void* out, float* low, int n, int m,
                                 int inner, int cols, int r, float s, int shared, int groups, const void* base) {
  emu::reset_error();
  if (dtype == 0)
    fused<float>(fwd, in, w, bias, shrink, expand, out, low, n, m, inner, cols, r, s, shared, groups, base);
  else if (dtype == 1)
    fused<__half>(fwd, in, w, bias, shrink, expand, out, low, n, m, inner, cols, r, s, shared, groups, base);
  else
    fused<__nv_bfloat16>(fwd, in, w, bias, shrink, expand, out, low, n, m, inner, cols, r, s, shared, groups, base);
  return emu::error();
}
extern "C" const char* emu_lora_grads(int dtype, const void* x, const void* dy, const float* xa, const float* dyb,
                                      void* ga, void* gb, int n, int m, int d, int k, int r, float s, int shared,
                                      int rows_per_split) {
  emu::reset_error();
  if (dtype == 0) grads<float>(x, dy, xa, dyb, ga, gb, n, m, d, k, r, s, shared, rows_per_split);
  else if (dtype == 1) grads<__half>(x, dy, xa, dyb, ga, gb, n, m, d, k, r, s, shared, rows_per_split);
  else grads<__nv_bfloat16>(x, dy, xa, dyb, ga, gb, n, m, d, k, r, s, shared, rows_per_split);
  return emu::error();
}
"""
# float32 runs the SIMT path, float16 and bfloat16 the WMMA path (fp16 with its range guard).
EMULATED_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include_dir() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulated_kernels():
    gxx, include = shutil.which("g++"), _cuda_include_dir()
    if gxx is None or include is None:
        pytest.skip("host emulation needs g++ and the CUDA headers (cuda_fp16.h)")
    sources = {name: (CSRC / name).read_text() for name in EMULATED}
    for name, kernel_text, stand_in in EMULATION_SWAPS:
        assert kernel_text in sources[name], f"{name} no longer contains {kernel_text!r}: update EMULATION_SWAPS"
        sources[name] = sources[name].replace(kernel_text, stand_in)
    start, end = "// 16-byte asynchronous copy", "// smem[r * ld_smem + c]"
    common = sources["common.cuh"]
    assert start in common and end in common, "common.cuh: the cp.async helpers moved; update the emulation test"
    sources["common.cuh"] = (common[:common.index(start)] + "using emu::cp_async_16;\nusing emu::cp_async_commit;\n"
                             "using emu::cp_async_wait;\n\n" + common[common.index(end):])
    prelude = (CSRC / "host_emulation.cuh").read_text()
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include}", "-include", "host_emulation.cuh",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    key = hashlib.sha256("\0".join([prelude, EMULATION_SHIM, *sources.values(), *flags]).encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / f"lora_ensemble_cuda_emulation_{key}"
    lib = build / "emulated_kernels.so"
    if not lib.exists():
        build.mkdir(exist_ok=True)
        for name, text in sources.items():
            (build / name).write_text(text)
        (build / "host_emulation.cuh").write_text(prelude)
        (build / "shim.cpp").write_text(EMULATION_SHIM)
        subprocess.run([gxx, *flags, "shim.cpp", "-o", "emulated_kernels.so.tmp"], cwd=build, check=True)
        (build / "emulated_kernels.so.tmp").rename(lib)
    dll = ctypes.CDLL(str(lib))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    dll.emu_fused.argtypes = [i32, i32] + [ptr] * 7 + [i32] * 5 + [ctypes.c_float, i32, i32, ptr]
    dll.emu_lora_grads.argtypes = [i32] + [ptr] * 6 + [i32] * 5 + [ctypes.c_float, i32, i32]
    for fn in (dll.emu_fused, dll.emu_lora_grads):
        fn.restype = ctypes.c_char_p
    return dll


class Guarded:
    """A tensor inside a NaN-filled buffer, ``shift`` elements off alignment. The guard zones on
    each side hold 128 rows of the tensor's last dim (a whole tile of overshoot), so reading past
    the ends feeds NaN into the results and writing past them is caught by :meth:`check_guards`."""

    def __init__(self, like: torch.Tensor, fill: torch.Tensor | None = None, shift: int = 0):
        guard = 64 * (2 * like.shape[-1] + 1)  # a multiple of 64 elements keeps 16-byte alignment
        self.buffer = torch.full((like.numel() + 2 * guard + shift,), float("nan"), dtype=like.dtype)
        self.start = guard + shift
        self.tensor = self.buffer[self.start:self.start + like.numel()].view(like.shape)
        if fill is not None:
            self.tensor.copy_(fill)

    @property
    def ptr(self) -> int:
        return self.tensor.data_ptr()

    def check_guards(self, name: str) -> None:
        outside = torch.cat([self.buffer[:self.start], self.buffer[self.start + self.tensor.numel():]])
        assert torch.isnan(outside).all(), f"{name}: a kernel wrote past the ends of the buffer"


def _call(fn, *args) -> None:
    error = fn(*args)
    assert error is None, f"host emulation: {error.decode()}"


# (dtype, N, rows per member, d, k, r, shared_input, bias, shift): two row and column tiles with
# ragged edges, aligned (cp.async) and misaligned (element fallback) operands, ranks 1..128.
EMULATION_CASES = [
    (torch.float16, 2, 70, 40, 136, 8, False, True, 0),
    (torch.float16, 3, 21, 24, 40, 128, True, True, 0),
    (torch.float16, 2, 65, 64, 129, 128, False, True, 0),  # rank tile 128 stacked: Q overlays the low tile
    (torch.bfloat16, 2, 70, 40, 136, 8, False, True, 0),
    (torch.bfloat16, 3, 21, 24, 40, 128, True, True, 0),
    (torch.float16, 2, 9, 20, 36, 33, False, False, 1),
    (torch.float16, 1, 17, 16, 24, 20, False, True, 0),
    (torch.float32, 3, 37, 100, 130, 33, True, False, 0),
    (torch.float32, 1, 1, 24, 40, 1, False, True, 1),
]


@pytest.mark.parametrize("case", EMULATION_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-M{c[2]}-d{c[3]}-k{c[4]}-r{c[5]}"
                                       f"{'-shared' if c[6] else ''}{'-shift' if c[8] else ''}")
def test_kernels_under_host_emulation(emulated_kernels, case):
    dtype, n, m, d, k, r, shared, bias, shift = case
    code, s = EMULATED_DTYPES[dtype], 0.7
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=shared, bias=bias, requires_grad=(), scaling=s)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    x, w, a, b = (Guarded(t, t, shift) for t in (x_rows, inp.weight, inp.lora_A, inp.lora_B))
    bias_buf = Guarded(inp.bias, inp.bias, shift) if bias else None
    out, xa = Guarded(torch.empty(n, m, k, dtype=dtype), shift=shift), Guarded(torch.empty(n, m, r))
    _call(emulated_kernels.emu_fused, code, 1, x.ptr, w.ptr, bias_buf.ptr if bias else None, a.ptr, b.ptr, out.ptr,
          xa.ptr, n, m, d, k, r, s, int(shared), 1, None)
    x64 = x_rows.double().expand(n, m, d) if shared else x_rows.double()
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, s, shared)
    assert_close_named("out", out.tensor, ref.reshape(n, m, k), dtype)
    assert_close_named("xa", xa.tensor, x64 @ inp.lora_A.double().transpose(1, 2), torch.float32)

    grad_out = torch.randn(n, m, k).to(dtype)
    dy = Guarded(grad_out, grad_out, shift)
    dx = Guarded(torch.empty((m, d) if shared else (n, m, d), dtype=dtype), shift=shift)
    dyb = Guarded(torch.empty(n, m, r))
    _call(emulated_kernels.emu_fused, code, 0, dy.ptr, w.ptr, None, b.ptr, a.ptr, dx.ptr, dyb.ptr, n, m, k, d, r, s,
          int(shared), 1, None)
    grads = lora_ensemble_reference_backward(grad_out.reshape(-1, k), inp.x, inp.weight, inp.lora_A, inp.lora_B, s,
                                             shared)
    assert_close_named("dx", dx.tensor, grads.x.reshape(dx.tensor.shape), dtype)
    assert_close_named("dyb", dyb.tensor, grad_out.double() @ inp.lora_B.double(), torch.float32)

    grad_A, grad_B = Guarded(inp.lora_A, shift=shift), Guarded(inp.lora_B, shift=shift)
    _call(emulated_kernels.emu_lora_grads, code, x.ptr, dy.ptr, xa.ptr, dyb.ptr, grad_A.ptr, grad_B.ptr, n, m, d, k,
          r, s, int(shared), m)
    assert_close_named("dA", grad_A.tensor, grads.lora_A, dtype)
    assert_close_named("dB", grad_B.tensor, grads.lora_B, dtype)
    for name, buf in {"out": out, "xa": xa, "dx": dx, "dyb": dyb, "dA": grad_A, "dB": grad_B}.items():
        buf.check_guards(name)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_fp16_split_beyond_fp16_range_under_host_emulation(emulated_kernels, shared):
    """The fp16 hi + lo split of s * x A^T (forward) and of xa / dyb (weight gradients) with values
    beyond fp16's range, whose exact products are well inside it: a plain split gives hi = inf,
    lo = -inf and so NaN; the kernels divide such tiles by a power of two instead."""
    n, m, d, k, r, s = 2, 40, 48, 40, 4, 64.0
    inp = make_inputs(n, m, d, k, r, dtype=torch.float16, shared_input=shared, requires_grad=(), scaling=s)
    with torch.no_grad():
        inp.x.mul_(30)
        inp.lora_A.mul_(10 * d**0.5)  # |x A^T| ~ 2e3, |s x A^T| ~ 1.3e5
        inp.lora_B.mul_(1e-3)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    out, xa = torch.empty(n, m, k, dtype=torch.float16), torch.empty(n, m, r)
    _call(emulated_kernels.emu_fused, 1, 1, x_rows.data_ptr(), inp.weight.data_ptr(), inp.bias.data_ptr(),
          inp.lora_A.data_ptr(), inp.lora_B.data_ptr(), out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s, int(shared), 1,
          None)
    assert (s * xa).abs().max() > 65504
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, s, shared)
    assert_close_named("out", out, ref.reshape(n, m, k), torch.float16)

    x_small = (x_rows * 1e-6).contiguous()
    grad_out = (torch.randn(n, m, k) * 1e-5).half()
    big_xa, big_dyb = torch.randn(n, m, r) * 1e5, torch.randn(n, m, r) * 1e5
    grad_A, grad_B = torch.empty(n, r, d, dtype=torch.float16), torch.empty(n, k, r, dtype=torch.float16)
    _call(emulated_kernels.emu_lora_grads, 1, x_small.data_ptr(), grad_out.data_ptr(), big_xa.data_ptr(),
          big_dyb.data_ptr(), grad_A.data_ptr(), grad_B.data_ptr(), n, m, d, k, r, s, int(shared), m)
    x64 = x_small.double().expand(n, m, d) if shared else x_small.double()
    assert_close_named("dA", grad_A, s * big_dyb.double().transpose(1, 2) @ x64, torch.float16)
    assert_close_named("dB", grad_B, s * grad_out.double().transpose(1, 2) @ big_xa.double(), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_member_groups_and_row_splits_under_host_emulation(emulated_kernels, dtype):
    """The shared-input forward and dx with their members in grid.y groups (as at batch 1 on a large
    GPU: each forward group computes x W0^T once, each dx group adds its members' sum into an fp32
    output), and the weight gradients with their rows split into ranges whose partial sums are added
    into fp32 outputs (long inputs)."""
    code, s = EMULATED_DTYPES[dtype], 0.7
    n, m, d, k, r = 5, 9, 24, 40, 3
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=True, requires_grad=(), scaling=s)
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, s, True).reshape(n, m, k)
    for groups in (2, 5):
        out, xa = torch.empty(n, m, k, dtype=dtype), torch.empty(n, m, r)
        _call(emulated_kernels.emu_fused, code, 1, inp.x.data_ptr(), inp.weight.data_ptr(), inp.bias.data_ptr(),
              inp.lora_A.data_ptr(), inp.lora_B.data_ptr(), out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s, 1, groups,
              None)
        assert_close_named(f"out (groups={groups})", out, ref, dtype)

    grad_out = torch.randn(n, m, k).to(dtype)
    dx_ref = lora_ensemble_reference_backward(grad_out.reshape(-1, k), inp.x, inp.weight, inp.lora_A, inp.lora_B, s,
                                              True).x
    for groups in (2, 5):
        dx_sum, dyb = torch.zeros(m, d), torch.empty(n, m, r)
        _call(emulated_kernels.emu_fused, code, 0, grad_out.data_ptr(), inp.weight.data_ptr(), None,
              inp.lora_B.data_ptr(), inp.lora_A.data_ptr(), dx_sum.data_ptr(), dyb.data_ptr(), n, m, k, d, r, s, 1,
              groups, None)
        assert_close_named(f"dx (groups={groups})", dx_sum, dx_ref, dtype)
        assert_close_named(f"dyb (groups={groups})", dyb, grad_out.double() @ inp.lora_B.double(), torch.float32)

    n, m = 2, 100
    x, grad_out = torch.randn(n, m, d).to(dtype), torch.randn(n, m, k).to(dtype)
    xa, dyb = torch.randn(n, m, r), torch.randn(n, m, r)
    sum_A, sum_B = torch.zeros(n, r, d), torch.zeros(n, k, r)
    _call(emulated_kernels.emu_lora_grads, code, x.data_ptr(), grad_out.data_ptr(), xa.data_ptr(), dyb.data_ptr(),
          sum_A.data_ptr(), sum_B.data_ptr(), n, m, d, k, r, s, 0, 32)  # 4 row ranges
    assert_close_named("dA (split)", sum_A, s * dyb.double().transpose(1, 2) @ x.double(), dtype)
    assert_close_named("dB (split)", sum_B, s * grad_out.double().transpose(1, 2) @ xa.double(), dtype)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_low_rank_update_over_a_given_base_under_host_emulation(emulated_kernels, dtype, shared):
    """Without W0 (a base layer the kernels cannot read): the forward adds the given base output and
    the members' update, the dx kernel computes the update's part alone."""
    code, s = EMULATED_DTYPES[dtype], 0.7
    n, m, d, k, r = 3, 37, 40, 72, 5
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=shared, requires_grad=(), scaling=s)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    base = torch.randn((m, k) if shared else (n, m, k)).to(dtype)
    out, xa = torch.empty(n, m, k, dtype=dtype), torch.empty(n, m, r)
    _call(emulated_kernels.emu_fused, code, 1, x_rows.data_ptr(), None, None, inp.lora_A.data_ptr(),
          inp.lora_B.data_ptr(), out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s, int(shared), 1, base.data_ptr())
    x64 = x_rows.double().expand(n, m, d) if shared else x_rows.double()
    want = base.double() + s * x64 @ inp.lora_A.double().transpose(1, 2) @ inp.lora_B.double().transpose(1, 2)
    assert_close_named("out", out, want, dtype)

    dy = torch.randn(n, m, k).to(dtype)
    dx, dyb = torch.empty((m, d) if shared else (n, m, d), dtype=dtype), torch.empty(n, m, r)
    _call(emulated_kernels.emu_fused, code, 0, dy.data_ptr(), None, None, inp.lora_B.data_ptr(),
          inp.lora_A.data_ptr(), dx.data_ptr(), dyb.data_ptr(), n, m, k, d, r, s, int(shared), 1, None)
    want_dx = s * dy.double() @ inp.lora_B.double() @ inp.lora_A.double()
    assert_close_named("dx", dx, want_dx.sum(0) if shared else want_dx, dtype)


# ---------------------------------------------------------------------------------------------
# GPU tests: nothing below runs without a CUDA device.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, rows per member, d, k, rank, lead): tile edges everywhere, d and k both aligned (16-byte
# copies) and misaligned (element fallback), a single row, one member, 3-D inputs.
SHAPES = [
    (3, 37, 72, 100, 8, None),
    (2, 70, 100, 136, 33, (7, 10)),
    (1, 1, 24, 40, 1, None),
    (4, 65, 130, 129, 128, (5, 13)),
    (2, 129, 256, 64, 16, None),
    (1, 33, 8, 300, 64, None),
]


def _ids(shape) -> str:
    n, m, d, k, r, lead = shape
    return f"N{n}-M{m}-d{d}-k{k}-r{r}" + ("-3d" if lead else "")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_against_reference(shape, shared_input, dtype):
    n, m, d, k, r, lead = shape
    inp = make_inputs(n, m, d, k, r, dtype=dtype, device="cuda", shared_input=shared_input, lead=lead)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 8, 33, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_noncontiguous_no_bias(rank, dtype):
    inp = make_inputs(3, 45, 96, 80, rank, dtype=dtype, device="cuda", bias=False, noncontiguous=True, scaling=1.0)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("requires_grad", [("x",), ("lora_A",), ("lora_B",), ("lora_A", "lora_B")])
def test_partial_gradients(requires_grad):
    inp = make_inputs(2, 31, 40, 56, 8, dtype=torch.float16, device="cuda", requires_grad=requires_grad)
    check_against_reference(inp, "cuda")


def _member_rows(inp):
    n, d = inp.lora_A.shape[0], inp.weight.shape[1]
    return inp.x.reshape(-1, d) if inp.shared_input else inp.x.reshape(n, -1, d)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_rank_byproducts(shared_input, dtype):
    """xa = x A^T and dyb = dy B come back in fp32, for every row of every member."""
    import lora_ensemble.backend_cuda as bc

    inp = make_inputs(3, 77, 136, 72, 20, dtype=dtype, device="cuda", shared_input=shared_input, requires_grad=())
    x = _member_rows(inp)
    out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    x64 = x.double() if not shared_input else x.double().expand(3, *x.shape)
    assert xa.dtype == torch.float32
    assert_close_named("xa", xa, x64 @ inp.lora_A.double().transpose(1, 2), dtype)
    dy = torch.randn_like(out)
    dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    assert dyb.dtype == torch.float32
    assert_close_named("dyb", dyb, dy.double() @ inp.lora_B.double(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(backend_cuda, op, shared_input):
    """Schema, fake impl and dispatch checks of opcheck on real CUDA tensors."""
    args = tuple(torch.randn(a.shape, dtype=a.dtype, device="cuda") if isinstance(a, torch.Tensor) else a
                 for a in _meta_args(op, shared_input))
    torch.library.opcheck(getattr(torch.ops.lora_ensemble, op).default, args)


@pytest.mark.gpu
def test_large_members_and_rows():
    """Many row tiles and members; M not a multiple of the tile."""
    inp = make_inputs(16, 197, 192, 192, 8, dtype=torch.bfloat16, device="cuda")
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_input_dx_in_member_groups(dtype):
    """Batch-1 sizes (few tiles, 16 members): the shared-input dx runs its members in groups whose
    partial sums meet in fp32 with atomics; under deterministic algorithms it runs one group. Both
    agree with the float64 reference, and the deterministic one is bitwise repeatable."""
    n, m, d, k, r, s = 16, 197, 192, 576, 8, 0.5
    inp = make_inputs(n, m, d, k, r, dtype=dtype, device="cuda", shared_input=True, requires_grad=(), scaling=s)
    dy = torch.randn(n, m, k, device="cuda").to(dtype)
    want = lora_ensemble_reference_backward(dy.reshape(-1, k), inp.x, inp.weight, inp.lora_A, inp.lora_B, s, True).x
    backward_dx = torch.ops.lora_ensemble.cuda_backward_dx
    grouped = backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, s, True)[0]
    assert_close_named("dx (member groups)", grouped, want, dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        once, again = (backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, s, True)[0] for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert_close_named("dx (deterministic)", once, want, dtype)
    assert torch.equal(once, again)


@pytest.mark.gpu
def test_nan_propagates_only_to_its_row():
    inp = make_inputs(2, 20, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x = inp.x.clone()
    x[3, 5] = float("inf")
    out = torch.ops.lora_ensemble.cuda_forward(x.reshape(2, 20, 32), inp.weight, inp.bias, None, inp.lora_A,
                                               inp.lora_B, inp.scaling, False)[0].reshape(40, 24)
    assert not torch.isfinite(out[3]).all()
    assert torch.isfinite(torch.cat([out[:3], out[4:]])).all()


@pytest.mark.gpu
def test_bad_inputs_raise_named_errors():
    inp = make_inputs(2, 8, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x3 = inp.x.reshape(2, 8, 32)
    fwd = torch.ops.lora_ensemble.cuda_forward
    with pytest.raises(RuntimeError, match="lora_B shape"):
        fwd(x3, inp.weight, inp.bias, None, inp.lora_A, inp.lora_B[:, :-1].contiguous(), 1.0, False)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        fwd(x3, inp.weight.float(), inp.bias, None, inp.lora_A, inp.lora_B, 1.0, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        fwd(x3.transpose(1, 2).contiguous().transpose(1, 2), inp.weight, inp.bias, None, inp.lora_A, inp.lora_B, 1.0,
            False)
    with pytest.raises(RuntimeError, match=r"rank r=129"):
        a, b = torch.zeros(2, 129, 32, device="cuda", dtype=torch.half), torch.zeros(2, 24, 129, device="cuda",
                                                                                      dtype=torch.half)
        fwd(x3, inp.weight, inp.bias, None, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fwd(x3, inp.weight.cpu(), inp.bias, None, inp.lora_A, inp.lora_B, 1.0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_cuda_graph_capture(shared_input):
    """The kernels launch on the current stream, so a captured graph replays them on new data."""
    import lora_ensemble.backend_cuda as bc

    inp = make_inputs(3, 50, 64, 48, 8, dtype=torch.float16, device="cuda", shared_input=shared_input,
                      requires_grad=())
    x = _member_rows(inp).clone()
    dy = torch.randn(3, 50, 48, device="cuda", dtype=torch.float16)

    def step():
        out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dA, dB = bc.backward_lora(dy, x, xa, dyb, inp.scaling, shared_input)
        return out, dx, dA, dB

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()

    x_user = x.reshape(-1, 64)  # stacked [N*M, d] or shared [M, d]
    ref = lora_ensemble_reference(x_user, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    grads = lora_ensemble_reference_backward(dy.reshape(-1, 48), x_user, inp.weight, inp.lora_A, inp.lora_B,
                                             inp.scaling, shared_input)
    tol = TOLERANCES[torch.float16]
    assert_close_named("out", captured[0].reshape(-1, 48), ref, torch.float16, tol)
    assert_close_named("dx", captured[1].reshape(-1, 64), grads.x, torch.float16, tol)
    assert_close_named("dA", captured[2], grads.lora_A, torch.float16, tol)
    assert_close_named("dB", captured[3], grads.lora_B, torch.float16, tol)
