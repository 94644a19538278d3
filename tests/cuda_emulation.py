"""The CUDA kernels' source on the CPU: builds ``csrc/cuda/host_emulation_entry.cpp`` with g++ and the
host emulation of the CUDA features the kernels use (``csrc/cuda/host_emulation.cuh``), and calls its
entry points, which plan and fill the kernels' parameters with the same ``make_params.cuh`` as the
extension's ``ops.cu``. Used by the host-emulation tests (test_cuda_backend.py, test_cuda_traffic.py,
test_launch_policies.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
ENTRY = "host_emulation_entry.cpp"
FLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-include", "host_emulation.cuh",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
# float32 runs the SIMT path, float16 and bfloat16 the WMMA path (fp16 with its range guard).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The SM count the tests plan for unless they say otherwise (an H100 SXM).
H100_SMS = 132
PLAN_FIELDS = ("block_rows", "block_k", "tile_members", "tile_rows", "row_tiles", "col_tiles", "member_groups",
               "k_splits", "k_per_split")


@dataclass(frozen=True)
class FusedPlan:
    """The launch plan of a fused call (csrc/cuda/make_params.cuh: FusedPlan)."""

    block_rows: int
    block_k: int
    tile_members: int
    tile_rows: int
    row_tiles: int
    col_tiles: int
    member_groups: int
    k_splits: int
    k_per_split: int


def _cuda_include_dir() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("g++") is None or _cuda_include_dir() is None:
        return "host emulation needs g++ and the CUDA headers (cuda_fp16.h)"
    return None


def _library() -> Path:
    """The emulation's shared library, built once per content of csrc/cuda (cached in the temp dir)."""
    include = _cuda_include_dir()
    flags = [*FLAGS, f"-I{include}", f"-I{CSRC}"]
    sources = sorted(CSRC.glob("*.cuh")) + [CSRC / ENTRY]
    key = hashlib.sha256("\0".join([*(s.read_text() for s in sources), *flags]).encode()).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"lora_ensemble_cuda_emulation_{key}" / "emulated_kernels.so"
    if not lib.exists():
        lib.parent.mkdir(exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([shutil.which("g++"), *flags, str(CSRC / ENTRY), "-o", str(tmp)], check=True)
        tmp.rename(lib)
    return lib


class Emulation:
    """The entry points of the built emulation, with Python signatures."""

    def __init__(self) -> None:
        dll = ctypes.CDLL(str(_library()))
        ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
        dll.emu_fused_plan.argtypes = [i32, i32, i64, i64, i64, i64, i64, i32, i32, ptr]
        dll.emu_fused.argtypes = [i32, i32] + [ptr] * 7 + [i64] * 5 + [f32, i32, ptr, i32]
        dll.emu_fused.restype = ctypes.c_char_p
        dll.emu_grad_plan_splits.argtypes = [i64] * 5 + [i32, i32]
        dll.emu_lora_grads.argtypes = [i32] + [ptr] * 6 + [i64] * 5 + [f32, i32, i32, i32]
        dll.emu_lora_grads.restype = ctypes.c_char_p
        dll.emu_watch.argtypes = [i32, ptr, i64]
        dll.emu_watched_bytes.argtypes = [i32]
        dll.emu_watched_bytes.restype = i64
        dll.emu_cta_order.argtypes = [i32, ctypes.c_uint]
        # launch_policy.cuh, for tests/test_launch_policies.py
        for name, argtypes, restype in (("emu_block_rank", [i64], i32),
                                        ("emu_row_tile_members", [i64, i64, i64], i64),
                                        ("emu_stacked_block_rows", [i64, i64, i32], i32),
                                        ("emu_stacked_tile_rows", [i32, i64, i64, i32], i64),
                                        ("emu_shared_block_rows", [i64, i64, i32], i32),
                                        ("emu_shared_member_groups", [i64, i64, i32], i32),
                                        ("emu_fused_k_splits", [i64, i64, i32, i32], i32),
                                        ("emu_grad_row_splits", [i64, i64, i32, i32], i32),
                                        ("emu_grad_rows_per_split", [i64, i32, i32], i64)):
            getattr(dll, name).argtypes = argtypes
            getattr(dll, name).restype = restype
        self.dll = dll

    def plan(self, dtype: torch.dtype, forward: bool, members: int, rows: int, inner: int, cols: int, rank: int,
             shared: bool, multiprocessors: int = H100_SMS) -> FusedPlan:
        out = (ctypes.c_longlong * len(PLAN_FIELDS))()
        self.dll.emu_fused_plan(DTYPE_CODES[dtype], int(forward), members, rows, inner, cols, rank, int(shared),
                                multiprocessors, out)
        return FusedPlan(*(int(v) for v in out))

    def fused(self, dtype: torch.dtype, forward: bool, inp: int, weight: int | None, bias: int | None, shrink: int,
              expand: int, out: int, low: int, members: int, rows: int, inner: int, cols: int, rank: int,
              scaling: float, shared: bool, base: int | None = None, multiprocessors: int = H100_SMS) -> None:
        """One fused launch on data pointers (forward: inp = x, shrink = A, expand = B; dx: inp = dy,
        shrink = B, expand = A). With shared and not forward, out is dx [M, d]."""
        _check(self.dll.emu_fused(DTYPE_CODES[dtype], int(forward), inp, weight, bias, shrink, expand, out, low,
                                  members, rows, inner, cols, rank, scaling, int(shared), base, multiprocessors))

    def grad_row_splits(self, members: int, rows: int, d: int, k: int, rank: int, multiprocessors: int = H100_SMS,
                        deterministic: bool = False) -> int:
        return self.dll.emu_grad_plan_splits(members, rows, d, k, rank, multiprocessors, int(deterministic))

    def lora_grads(self, dtype: torch.dtype, x: int, dy: int, xa: int, dyb: int, grad_A: int, grad_B: int,
                   members: int, rows: int, d: int, k: int, rank: int, scaling: float, shared: bool,
                   multiprocessors: int = H100_SMS, deterministic: bool = False) -> None:
        """The weight gradients; with more than one row split grad_A / grad_B must be zeroed fp32."""
        _check(self.dll.emu_lora_grads(DTYPE_CODES[dtype], x, dy, xa, dyb, grad_A, grad_B, members, rows, d, k, rank,
                                       scaling, int(shared), multiprocessors, int(deterministic)))

    @contextlib.contextmanager
    def watching(self, **tensors: torch.Tensor) -> Iterator[dict[str, int]]:
        """Counts the elements operand loads read from each named tensor's storage while inside; the
        dict yielded is filled on exit."""
        names = list(tensors)
        assert len(names) <= 8
        self.dll.emu_unwatch_all()
        for slot, name in enumerate(names):
            t = tensors[name]
            self.dll.emu_watch(slot, t.data_ptr(), t.numel() * t.element_size())
        counts: dict[str, int] = {}
        try:
            yield counts
        finally:
            for slot, name in enumerate(names):
                counts[name] = self.dll.emu_watched_bytes(slot) // tensors[name].element_size()
            self.dll.emu_unwatch_all()

    @contextlib.contextmanager
    def cta_order(self, order: int, seed: int = 0) -> Iterator[None]:
        """CTAs run in grid order (0), reversed (1) or shuffled with the seed (2) while inside."""
        self.dll.emu_cta_order(order, seed)
        try:
            yield
        finally:
            self.dll.emu_cta_order(0, 0)


def emulation_or_skip() -> Emulation:
    """The built emulation, for a test module's fixture; skips the module where it cannot be built."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return Emulation()


def _check(error: bytes | None) -> None:
    assert error is None, f"host emulation: {error.decode()}"


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
