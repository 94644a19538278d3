"""The fused backends' device calls stubbed out, so that their host cost per call can be measured on a
machine without a GPU, next to the composite, in the same process.

What is stubbed, and so not measured:

* ``triton``: Triton's JIT (``JITFunction.run``: binding, compiling, launching) returns a stand-in
  compiled kernel, Triton's driver is a stand-in whose current stream is 0, and timing a candidate
  config (``triton.testing.do_bench``) returns equal times (so the cost model's first wins). The JIT
  runs once per launch key (its first call); every later call runs as on a GPU: validation, the
  autograd node, the launcher (sizes, strides, the launch key and its lookup), the bound kernel's
  launch and Triton's own launcher (``CompiledKernel.run``: in triton 3.8 a Python function that
  allocates scratch), whose last step, the C launch (argument parsing, ``cuLaunchKernel``), is the
  no-op (where Triton's launcher cannot run so, all of ``CompiledKernel.run`` is).
* ``cuda``: the extension's three ops get CPU kernels that allocate their outputs and return (compiled
  once with ``torch.utils.cpp_extension.load_inline``, about a minute, then cached). Everything before
  the op runs as on a GPU, the dispatcher included; the op body's argument checks and the CUDA launch
  are not measured.
* ``auto``: chooses among the stubbed backends and the composite on the CPU, per shape, as it does
  among the real ones on a GPU (measuring each once; nothing is written to the tuning folder).

The kernels never run, so outputs and gradients are uninitialised memory: only the time means anything.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import types
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch

from lora_ensemble import auto_backend, backends, functional, tuning_store

__all__ = ["STUBBED_PARTS", "STUB_SUFFIX", "stubbed_device_calls"]

STUB_SUFFIX = "*"  # appended to a backend name whose device calls are stubbed: "functional[triton*]"
# What the stubs leave out, per backend (the triton entry is set when the stub is made: it depends on
# whether this Triton's Python launcher can run on a stand-in).
STUBBED_PARTS: dict[str, str] = {
    "cuda": "the extension ops' bodies: their argument checks and cudaLaunchKernel (CPU kernels that allocate the "
            "outputs stand in)",
}

_CUDA_OP_STUBS = r"""
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {
using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair forward(const at::Tensor& x, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
             const std::optional<at::Tensor>&, const at::Tensor& lora_A, const at::Tensor& lora_B, double, bool) {
  const int64_t n = lora_A.size(0), r = lora_A.size(1), k = lora_B.size(1), m = x.size(-2);
  return {at::empty({n, m, k}, x.options()), at::empty({n, m, r}, x.options().dtype(at::kFloat))};
}

Pair backward_dx(const at::Tensor& grad_out, const std::optional<at::Tensor>&, const at::Tensor& lora_A,
                 const at::Tensor&, double, bool shared_input) {
  const int64_t n = grad_out.size(0), m = grad_out.size(1), r = lora_A.size(1), d = lora_A.size(2);
  at::Tensor dx = shared_input ? at::empty({m, d}, grad_out.options()) : at::empty({n, m, d}, grad_out.options());
  return {dx, at::empty({n, m, r}, grad_out.options().dtype(at::kFloat))};
}

Pair backward_lora(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa, const at::Tensor&, double,
                   bool) {
  const int64_t n = grad_out.size(0), k = grad_out.size(2), r = xa.size(2), d = x.size(-1);
  return {at::empty({n, r, d}, grad_out.options()), at::empty({n, k, r}, grad_out.options())};
}
}  // namespace

TORCH_LIBRARY_IMPL(lora_ensemble, CPU, m) {
  m.impl("cuda_forward", forward);
  m.impl("cuda_backward_dx", backward_dx);
  m.impl("cuda_backward_lora", backward_lora);
}
"""


# Triton's driver as the bound launch asks it for the current stream.
_DRIVER = SimpleNamespace(get_current_stream=lambda device: 0, get_current_device=lambda: 0)


def _no_op(*args: object) -> None:
    return None


def _driver_launcher() -> Callable[..., None]:
    """A compiled kernel's ``run`` with only the C launch stubbed (call it with the stand-in driver
    active): Triton's own launcher (``CudaLauncher.__call__``: triton 3.8 allocates its scratch in
    Python there) on a stand-in whose C launch (argument parsing, ``cuLaunchKernel``) is a no-op and
    which needs no scratch; where that launcher does not run so (another Triton), the no-op."""
    with contextlib.suppress(ImportError, AttributeError, TypeError):
        from triton.backends.nvidia.driver import CudaLauncher

        stand_in = SimpleNamespace(gsan_enabled=False, arg_annotations=(), kernel_signature=b"", num_ctas=1,
                                   launch=_no_op, global_scratch_size=0, global_scratch_align=1,
                                   profile_scratch_size=0, profile_scratch_align=1, launch_cooperative_grid=False,
                                   launch_pdl=False)
        run = types.MethodType(CudaLauncher.__call__, stand_in)
        run(1, 1, 1, 0, 0, (), None, None, None, 0)  # every attribute this Triton's launcher reads is there
        STUBBED_PARTS["triton"] = ("the JIT on a launch key's first call (equal candidate timings) and the C launch "
                                   "(argument parsing, cuLaunchKernel); Triton's Python launcher runs")
        return run
    STUBBED_PARTS["triton"] = ("the JIT on a launch key's first call (equal candidate timings) and the compiled "
                               "kernel's whole launcher (CompiledKernel.run)")
    return _no_op


def _stub_cuda_ops() -> str | None:
    """Register the CPU stubs of the extension's ops; None, or why the ``cuda`` backend cannot be stubbed."""
    try:
        importlib.import_module("lora_ensemble.backend_cuda")  # the ops' schemas, from lora_ensemble._C
    except (ImportError, OSError, RuntimeError) as exc:
        return f"the extension does not load: {exc}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ensemble::cuda_forward", "CPU"):
        from torch.utils.cpp_extension import load_inline

        load_inline(name="lora_ensemble_cuda_op_stubs", cpp_sources=_CUDA_OP_STUBS, is_python_module=False)
    return None


@contextlib.contextmanager
def _triton_launch_stubbed() -> Iterator[str | None]:
    """Triton's JIT launch a no-op and its autotuner benchmark-free; yields None, or why not possible
    (the interpreter runs kernels for real on the CPU)."""
    from lora_ensemble.backends import triton_interpreting

    if triton_interpreting():
        yield "TRITON_INTERPRET=1 runs the kernels in the interpreter: unset it to stub the launch"
        return
    import triton.testing
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run, triton.testing.do_bench
    active = getattr(driver, "_active", None)  # None until a driver is asked for (none can be made here)
    driver.set_active(_DRIVER)
    # A compiled kernel as the launcher binds it (kernels/launcher.py).
    compiled = SimpleNamespace(run=_driver_launcher(), function=0, packed_metadata=(), launch_metadata=_no_op)
    JITFunction.run = lambda self, *args, **kwargs: compiled
    triton.testing.do_bench = lambda fn, **kwargs: 1.0
    try:
        yield None
    finally:
        JITFunction.run, triton.testing.do_bench = saved
        driver.set_active(active)


@contextlib.contextmanager
def stubbed_device_calls() -> Iterator[dict[str, str]]:
    """While inside: the ``triton`` and ``cuda`` backends run on CPU tensors with their device calls
    stubbed, and ``auto`` chooses among them and ``torch``. Yields ``{backend: why not}`` for those that
    cannot be stubbed here (an empty dict when both can)."""
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        reason = stack.enter_context(_triton_launch_stubbed())
        if reason is not None:
            skipped["triton"] = reason
        reason = _stub_cuda_ops()
        if reason is not None:
            skipped["cuda"] = reason
        stubbed = tuple(b for b in ("triton", "cuda") if b not in skipped)
        original_reason, original_candidates = backends.unavailable_reason, backends.auto_candidates

        def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
            if name in stubbed and (device is None or torch.device(device).type == "cpu"):
                return None
            return original_reason(name, device)

        def auto_candidates(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
            return (*stubbed, "torch") if dtype in backends.FUSED_DTYPES else ("torch",)

        saved_dir = os.environ.get(tuning_store.CACHE_DIR_VARIABLE)
        os.environ[tuning_store.CACHE_DIR_VARIABLE] = ""  # auto's CPU measurements stay in memory
        backends.unavailable_reason, backends.auto_candidates = unavailable_reason, auto_candidates
        auto_backend.auto_candidates = auto_candidates
        functional._resolve_cached.cache_clear()
        try:
            yield skipped
        finally:
            backends.unavailable_reason, backends.auto_candidates = original_reason, original_candidates
            auto_backend.auto_candidates = original_candidates
            functional._resolve_cached.cache_clear()
            auto_backend._CHOICES.clear()
            auto_backend._DECISIONS.clear()
            if saved_dir is None:
                del os.environ[tuning_store.CACHE_DIR_VARIABLE]
            else:
                os.environ[tuning_store.CACHE_DIR_VARIABLE] = saved_dir
