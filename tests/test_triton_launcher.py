"""The Triton launchers' bound launch path (kernels/launcher.py) with real ``triton.jit`` functions.

The kernels cannot run here (no GPU, and the interpreter has no compiled kernels), so a new process
without ``TRITON_INTERPRET`` runs the launchers with Triton's JIT replaced by a recorder: it binds the
arguments with Triton's own binder for an sm_90 target (what ``JITFunction.run`` passes to a compiled
kernel's launcher) and returns a stand-in compiled kernel that records what the bound path launches
it with. Each launch key's first call goes through the JIT, its later calls straight to the compiled
kernel, with the very arguments Triton's binder gives, and its candidates are the cost model's best
few (timing a candidate is stubbed: equal times, so the model's first wins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import torch
import triton.testing
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime import driver
from triton.runtime.jit import JITFunction, create_function_from_signature

from lora_ensemble.kernels import fused_lora_gemm, lora_grads

backend = make_backend(GPUTarget("cuda", 90, 32))
jit_calls, launches, timed = [], [], []


class Compiled:  # what the bound path calls: run(grid..., stream, function, metadata, hooks..., *args)
    function, packed_metadata = 0, ()

    @staticmethod
    def run(g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_hook, *args):
        launches.append(((g0, g1, g2), args))

    @staticmethod
    def launch_metadata(*args):
        return None


def jit_run(self, *args, grid, warmup, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, backend)
    kwargs.pop("num_warps"), kwargs.pop("num_stages"), kwargs.pop("num_ctas", None), kwargs.pop("maxnreg", None)
    bound, _, _ = binder(*args, **kwargs)
    if not warmup:
        jit_calls.append((tuple(grid), tuple(bound.values())))
    return Compiled


def bench(fn, **kwargs):
    timed.append(1)
    return 1.0


JITFunction.run = jit_run
triton.testing.do_bench = bench
driver.set_active(type("Driver", (), {"get_current_stream": staticmethod(lambda device: 0)})())

def described(value):  # a tensor by its layout (each call allocates its own outputs), anything else as it is
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype))
    return value


def same(a, b):
    return len(a) == len(b) and all(described(x) == described(y) for x, y in zip(a, b))


report = {}
g = torch.Generator().manual_seed(0)
for label, shared in (("stacked", False), ("shared", True)):
    n, m, d, k, r = 16, 50, 768, 768, 8
    x = torch.randn((m, d) if shared else (n, m, d), generator=g, dtype=torch.bfloat16)
    w, b = torch.randn(k, d, dtype=torch.bfloat16), torch.randn(k, dtype=torch.bfloat16)
    a, bb = torch.randn(n, r, d, dtype=torch.bfloat16), torch.randn(n, k, r, dtype=torch.bfloat16)
    for call in range(3):
        jit_calls.clear(), launches.clear(), timed.clear()
        fused_lora_gemm.launch_fused_lora_gemm(x, w, a, bb, b, 0.5, transposed=True)
        report[f"{label} {call}"] = {"jit": len(jit_calls), "launches": len(launches), "timed": len(timed)}
        if call == 0:
            grid, first_args = jit_calls[0]
        else:
            report[f"{label} {call}"]["same_args"] = same(launches[0][1], first_args)
            report[f"{label} {call}"]["same_grid"] = launches[0][0] == (*grid, 1, 1)[:3]
    kernel = fused_lora_gemm._SHARED if shared else fused_lora_gemm._STACKED
    (tuning,) = kernel.tunings.values()
    report[f"{label} tuning"] = {"source": tuning.source, "timed": sorted(tuning.timings_us)}
# weight gradients, twice
gy, xx = torch.randn(4, 40, 24, dtype=torch.float16), torch.randn(4, 40, 20, dtype=torch.float16)
xa, dyb = torch.randn(4, 40, 3), torch.randn(4, 40, 3)
for call in range(2):
    jit_calls.clear(), launches.clear()
    lora_grads.launch_lora_grads(gy, xx, xa, dyb, 0.5)
    if call == 0:
        grid, first_args = jit_calls[0]
    else:
        report["grads 1"] = {"jit": len(jit_calls), "launches": len(launches),
                             "same_args": same(launches[0][1], first_args)}
print(json.dumps(report))
"""


def test_bound_launches_pass_what_tritons_binder_gives_and_time_at_most_three_candidates():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), LORA_ENSEMBLE_CACHE_DIR="", LORA_ENSEMBLE_TRITON_AUTOTUNE="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for label in ("stacked", "shared"):
        # First call: through Triton's JIT (bound once), after timing the model's best candidates.
        first = report[f"{label} 0"]
        assert first["jit"] == 1 and first["launches"] == 0 and 2 <= first["timed"] <= 3, first
        tuning = report[f"{label} tuning"]
        assert tuning["source"] == "timed" and len(tuning["timed"]) == first["timed"], tuning
        # Later calls: the compiled kernel directly, with the binder's arguments and the same grid.
        for call in (1, 2):
            later = report[f"{label} {call}"]
            assert later == {"jit": 0, "launches": 1, "timed": 0, "same_args": True, "same_grid": True}, later
    assert report["grads 1"] == {"jit": 0, "launches": 1, "same_args": True}, report["grads 1"]
