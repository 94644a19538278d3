"""``lora_ensemble.compiling_ahead``: a model's Triton keys compiled together before its first fused call.

Under the interpreter (conftest) nothing compiles, so the in-process tests check what the block
computes (the composite's result, bit for bit, never an unwritten output), which launch keys it
submits, that it launches and binds nothing, and that ``auto`` decides only after it. The last test
compiles for real: a new process without the interpreter compiles the kernels for an sm_90 target on
this CPU (Triton's driver a stand-in, the compiled kernels' device launch stubbed) and checks that the
first calls after the block find every config they run or time already compiled, by Triton's own
cache key."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ensemble import FusedLoRAEnsembleLinear, compiling_ahead, functional
from lora_ensemble import auto_backend as ab
from lora_ensemble.compile_ahead import ahead_compiles
from lora_ensemble.kernels import fused_lora_gemm, lora_grads
from lora_ensemble.reference import lora_ensemble_reference

ROOT = Path(__file__).resolve().parents[1]
KERNELS = (fused_lora_gemm._STACKED, fused_lora_gemm._SHARED, lora_grads._GRADS)


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """No launch key bound and no config chosen yet, nothing stored: a new process's launchers."""
    monkeypatch.setenv("LORA_ENSEMBLE_CACHE_DIR", str(tmp_path))
    for kernel in KERNELS:
        monkeypatch.setattr(kernel, "bound", {})
        monkeypatch.setattr(kernel, "tunings", {})


def two_layers(backend: str, shared_input: bool = False, **factory) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        FusedLoRAEnsembleLinear(20, 24, num_members=3, rank=2, backend=backend, shared_input=shared_input, **factory),
        FusedLoRAEnsembleLinear(24, 12, num_members=3, rank=5, backend=backend, **factory))


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("shared_input", [False, True])
def test_the_block_computes_the_composite_and_launches_nothing(fresh_kernels, shared_input):
    x = torch.randn(5, 20) if shared_input else torch.randn(3, 5, 20)
    expected_out, expected_grads = step(two_layers("torch", shared_input), x)
    model = two_layers("triton", shared_input)
    with compiling_ahead() as ahead:
        assert ahead_compiles() is ahead
        out, grads = step(model, x)
    assert ahead_compiles() is None
    # The composite's bits (the outputs are allocated poisoned: an unwritten one would be NaN).
    assert torch.equal(out, expected_out)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))
    assert all(not kernel.bound for kernel in KERNELS)  # nothing launched, nothing bound
    # Per layer: the forward's key, the dx key (the first layer's only with a shared input: the
    # stacked x of an unshared first layer needs no gradient), the weight gradients' key.
    kernels = [name for name, _, _ in ahead.keys]
    forward = "fused_lora_gemm_shared" if shared_input else "fused_lora_gemm"
    assert kernels.count("lora_grads") == 2 and forward in kernels, ahead.keys
    assert all(1 <= count <= 3 for _, _, count in ahead.keys), ahead.keys
    assert "launch keys" in ahead.summary()
    # After the block the kernels run (here in the interpreter) and are bound.
    model.zero_grad()
    out, _ = step(model, x)
    layers = list(model)
    h = lora_ensemble_reference(x.double(), layers[0].weight.double(), layers[0].bias.double(),
                                layers[0].lora_A.double(), layers[0].lora_B.double(), layers[0].scaling,
                                shared_input)
    y = lora_ensemble_reference(h, layers[1].weight.double(), layers[1].bias.double(), layers[1].lora_A.double(),
                                layers[1].lora_B.double(), layers[1].scaling, False)
    torch.testing.assert_close(out.double(), y, rtol=1e-4, atol=1e-4)
    assert any(kernel.bound for kernel in KERNELS)


def test_a_key_met_again_in_the_block_is_submitted_once(fresh_kernels):
    model = two_layers("triton")
    x = torch.randn(3, 5, 20)
    with torch.no_grad(), compiling_ahead() as ahead:
        model(x)
        model(x)
    assert len(ahead.keys) == 2, ahead.keys


def test_a_key_bound_before_the_block_launches_nothing_inside_it(fresh_kernels):
    model = two_layers("triton")
    x = torch.randn(3, 5, 20)
    step(model, x)  # binds the forward's, the dx's and the weight gradients' keys
    bound = {(kernel.name, key) for kernel in KERNELS for key in kernel.bound}
    launched = []
    for kernel in KERNELS:
        for key in kernel.bound:
            kernel.bound[key] = lambda args, _key=(kernel.name, key): launched.append(_key)
    model.zero_grad()
    expected_out, expected_grads = step(two_layers("torch"), x)
    with compiling_ahead() as ahead:
        out, grads = step(model, x)
    assert not launched  # the composite computed the step: no bound launch ran
    assert torch.equal(out, expected_out)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))
    # Each key is met (one config: the choice made before) and stays bound.
    assert sorted((name, count) for name, _, count in ahead.keys) == sorted((name, 1) for name, _ in bound), ahead.keys
    assert {(kernel.name, key) for kernel in KERNELS for key in kernel.bound} == bound
    step(model, x)
    assert len(launched) == len(bound)  # after the block, the bound launches again


def test_the_summary_counts_launch_keys_tuning_keys_and_configs(fresh_kernels):
    model = two_layers("triton")
    with torch.no_grad(), compiling_ahead() as ahead:
        model(torch.randn(3, 6, 20))
        model(torch.randn(3, 7, 20))  # 6 and 7 rows a member: one bucket, one row tiling (32-row tiles)
    assert len(ahead.keys) == 4 and len({key for _, key, _ in ahead.keys}) == 2, ahead.keys
    configs = sum(count for _, _, count in ahead.keys)
    assert ahead.summary().startswith(f"compiled ahead: 4 launch keys of 2 tuning keys, {configs} configs submitted"), (
        ahead.summary())


def test_pinned_tuning_submits_the_models_first_config_alone(fresh_kernels, monkeypatch):
    monkeypatch.setenv("LORA_ENSEMBLE_TRITON_AUTOTUNE", "0")
    with torch.no_grad(), compiling_ahead() as ahead:
        two_layers("triton")(torch.randn(3, 5, 20))
    assert [count for _, _, count in ahead.keys] == [1, 1]
    # The choice is made: the first call after the block runs that config, with nothing timed.
    assert [t.source for k in KERNELS for t in k.tunings.values()] == ["pinned: the model's first"] * 2


@pytest.mark.gpu
def test_on_a_gpu_the_first_step_after_the_block_compiles_nothing(fresh_kernels, monkeypatch):
    from triton.runtime.jit import JITFunction

    x = torch.randn(3, 5, 20, device="cuda", dtype=torch.bfloat16)
    expected, expected_grads = step(two_layers("torch", device="cuda", dtype=torch.bfloat16), x)
    model = two_layers("triton", device="cuda", dtype=torch.bfloat16)
    with compiling_ahead() as ahead:
        out, _ = step(model, x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)  # the composite (cuBLAS may pick other kernels)
    assert ahead.keys and ahead.workers > 0
    compiles = []
    do_compile = JITFunction._do_compile

    def counted(self, *args, **kwargs):
        compiles.append(self)
        return do_compile(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counted)
    model.zero_grad()
    out, grads = step(model, x)
    assert not compiles  # every config timed and run was compiled in the block
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=5e-2, atol=5e-2)


def test_a_cuda_graph_captured_inside_the_block_is_refused_before_any_launch(fresh_kernels, monkeypatch):
    # No GPU here: the capture is what torch.cuda reports during one.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    model = two_layers("triton")
    with compiling_ahead() as ahead, torch.no_grad(), pytest.raises(RuntimeError, match="would replay it for good"):
        model(torch.randn(3, 5, 20))
    assert not ahead.keys and all(not kernel.bound for kernel in KERNELS)
    with torch.no_grad():  # outside a block the fused call runs as it would in a capture
        assert torch.isfinite(model(torch.randn(3, 5, 20))).all()


def test_each_config_choice_is_logged_once(fresh_kernels, caplog):
    caplog.set_level(logging.DEBUG, logger="lora_ensemble.triton")
    model, x = two_layers("triton"), torch.randn(3, 5, 20)
    with torch.no_grad():
        model(x)
        model(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "lora_ensemble.triton"]
    # The interpreter has one config: each layer's key logs it once, with the key and the reason.
    assert len(lines) == 2 and all(line.startswith("fused_lora_gemm on cpu, ") for line in lines), lines
    assert all(line.endswith("(the only candidate)") for line in lines), lines


def test_blocks_do_not_nest_and_workers_are_checked():
    with compiling_ahead(), pytest.raises(RuntimeError, match="do not nest"):
        with compiling_ahead():
            pass
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        with compiling_ahead(workers=0):
            pass
    assert ahead_compiles() is None


def test_auto_decides_after_the_block(fresh_kernels, two_candidates, monkeypatch):
    monkeypatch.setenv(ab.MEASURE_VARIABLE, "0")  # decide by the model: no timing on this CPU
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 5, 20), torch.randn(24, 20), torch.randn(24)
    a, bb = torch.randn(3, 2, 20), torch.randn(3, 24, 2)
    composite = functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="torch")
    with compiling_ahead() as ahead:
        out = functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")
    assert torch.equal(out, composite)
    assert [name for name, _, _ in ahead.keys] == ["fused_lora_gemm"]  # Triton's compile was submitted
    assert not ab._DECISIONS and not ab._CHOICES  # and nothing was decided
    functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")
    assert [d.source for d in ab._DECISIONS.values()] == ["model"]


SCRIPT = r"""
import json, logging, sys, time
import torch
import triton.testing
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from lora_ensemble import backend_torch, backend_triton, compiling_ahead
from lora_ensemble.kernels import fused_lora_gemm, lora_grads

target = GPUTarget("cuda", 90, 32)
driver.set_active(type("Driver", (), {
    "get_current_device": staticmethod(lambda: 0), "get_current_stream": staticmethod(lambda device: 0),
    "get_current_target": staticmethod(lambda: target)})())
launches, compiles = [], []
# The compiled kernels' device launch is a recorder; compiling is real (ptxas for sm_90).
CompiledKernel.run = property(lambda self: lambda *args: launches.append(self.name))
CompiledKernel.launch_metadata = lambda self, *args: None
do_compile = JITFunction._do_compile


def counted(self, *args, **kwargs):
    compiles.append(self.__name__)
    return do_compile(self, *args, **kwargs)


def bench(fn, **kwargs):
    fn()
    return 1.0


JITFunction._do_compile = counted
triton.testing.do_bench = bench
logged = []
log = logging.getLogger("lora_ensemble.triton")
log.setLevel(logging.DEBUG)
log.addHandler(type("Keep", (logging.Handler,), {"emit": lambda self, record: logged.append(record.getMessage())})())

torch.manual_seed(0)
n, m, d, k, r = 4, 24, 64, 48, 8
half = {"dtype": torch.float16}
x, w, bias = torch.randn(n, m, d, **half), torch.randn(k, d, **half), torch.randn(k, **half)
a, b = torch.randn(n, r, d, **half), torch.randn(n, k, r, **half)


def step():
    out, xa = backend_triton.forward(x, w, bias, a, b, 0.5, False)
    dx, dyb = backend_triton.backward_dx(out, w, a, b, 0.5, False)
    grads = backend_triton.backward_lora(out, x, xa, dyb, 0.5, False)
    return out, dx, grads


if sys.argv[1] == "second":  # a second process: the winners stored, the binaries in Triton's disk cache
    started = time.perf_counter()
    step()
    report = {"seconds": time.perf_counter() - started, "jit_compiles": len(compiles), "launches": len(launches)}
else:
    started = time.perf_counter()
    with compiling_ahead(workers=2) as ahead:
        out, dx, grads = step()
    composite = backend_torch.forward(x, w, bias, a, b, 0.5, False)[0]
    report = {"keys": ahead.keys, "block_compiles": len(compiles), "block_launches": len(launches),
              "same_as_composite": bool(torch.equal(out, composite)), "workers": ahead.workers}
    compiles.clear()
    step()
    report["seconds"] = time.perf_counter() - started
    report["after_compiles"] = len(compiles)
    report["after_launches"] = len(launches)
report["tunings"] = [t.source for kernel in (fused_lora_gemm._STACKED, lora_grads._GRADS)
                     for t in kernel.tunings.values()]
report["log"] = logged
print(json.dumps(report))
"""


def test_the_first_calls_after_the_block_compile_nothing_and_a_second_process_reads_it_all(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), LORA_ENSEMBLE_CACHE_DIR=str(tmp_path / "tuning"),
               LORA_ENSEMBLE_TRITON_AUTOTUNE="1", TRITON_CACHE_DIR=str(tmp_path / "triton"))

    def run(part: str) -> dict:
        done = subprocess.run([sys.executable, "-c", SCRIPT, part], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    report = run("first")
    # Forward, dx (the same fused kernel, another key) and the weight gradients: each key's best few.
    assert [name for name, _, _ in report["keys"]] == ["fused_lora_gemm", "fused_lora_gemm", "lora_grads"]
    submitted = sum(count for _, _, count in report["keys"])
    assert report["block_compiles"] == submitted and report["block_launches"] == 0, report
    assert report["same_as_composite"] and report["workers"] == 2, report
    # After it: every config timed and run is already compiled (Triton's cache key), three bound launches.
    assert report["after_compiles"] == 0, report
    assert report["tunings"] == ["timed"] * 3 and report["after_launches"] >= 3, report
    # Logged (lora_ensemble.triton, DEBUG): the block's summary, then each key's choice with its timings.
    summary = "compiled ahead: 3 launch keys of 3 tuning keys, 8 configs submitted (2 threads;"
    assert report["log"][0].startswith(summary), report["log"]
    assert sum("(timed: " in line and "compiled and timed in" in line for line in report["log"]) == 3, report["log"]
    # A second process: each key's stored winner alone, its binary from Triton's disk cache (no new file).
    binaries = sorted((tmp_path / "triton").rglob("*.cubin"))
    second = run("second")
    assert second["tunings"] == ["stored"] * 3 and second["jit_compiles"] == 3 and second["launches"] == 3, second
    assert [line.endswith("(stored)") for line in second["log"]] == [True] * 3, second["log"]
    assert sorted((tmp_path / "triton").rglob("*.cubin")) == binaries and len(binaries) == submitted
    print(f"first process {report['seconds']:.2f} s, second {second['seconds']:.2f} s")


def test_a_short_generate_meets_the_prompts_and_the_decode_steps_keys(fresh_kernels):
    pytest.importorskip("transformers")
    from lora_ensemble import LoRAEnsemble

    from .hf_tiny import causal_lm, left_padded, randomise

    def ensemble(backend: str) -> LoRAEnsemble:
        torch.manual_seed(0)
        model = LoRAEnsemble(causal_lm("llama").float(), num_members=3, rank=2, backend=backend)
        randomise(model)
        return model

    ids, mask = left_padded(2, 5, [0, 2])
    expected = ensemble("torch").generate(ids, attention_mask=mask, max_new_tokens=3)
    model = ensemble("triton")
    with compiling_ahead() as ahead:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(out, expected)
    # The prompt's rows (5 a member) and the decode step's (1 a member) are other keys of the same layers.
    rows = {key.split(" rows")[1].split()[0] for _, key, _ in ahead.keys if " rows" in key}
    assert len(rows) >= 2, ahead.keys
    assert all(not kernel.bound for kernel in KERNELS)
