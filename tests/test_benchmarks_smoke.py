"""The benchmark suite still works: every CPU provider runs once on a tiny shape and computes the op
(no timing is asserted), the end-to-end models run a step, and report.py renders the committed run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from benchmarks import report
from benchmarks.baselines import GROUPED_MM_MISSING, grouped_mm
from benchmarks.bench_overhead import MODES as OVERHEAD_MODES
from benchmarks.cost_model import MODES
from benchmarks.e2e_models import E2E_PROVIDERS, build_e2e_run, e2e_unavailable_reason, make_e2e_step
from benchmarks.machine import parse_nvidia_smi_csv
from benchmarks.measure import (
    MAX_DEVICE_CALLS,
    MIN_DEVICE_CALLS,
    MIN_FLUSH_BYTES,
    device_calls,
    device_time,
    flush_bytes,
    memory_peak,
    timed_calls,
)
from benchmarks.providers import (
    OP_PROVIDERS,
    build_op_run,
    forward_extra_bytes,
    make_step,
    provider_unavailable_reason,
)
from benchmarks.shapes import EndToEndShape, OpShape
from lora_ensemble import available_backends
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward

from .utils import assert_close_named, make_inputs

CPU = torch.device("cpu")
# N=3, 6 rows per member (vmap_paper: 2 sequences of 3 tokens), d=17, k=11, r=2: odd sizes, which
# grouped_mm refuses (its strides must be 16-byte multiples); it has a test of its own below.
SMOKE_SHAPE = OpShape("smoke", 3, 6, 17, 11, 2, seq_len=3)
OP_ON_CPU = [p for p in OP_PROVIDERS if provider_unavailable_reason(p, CPU, torch.float32, SMOKE_SHAPE) is None]
E2E_ON_CPU = [p for p in E2E_PROVIDERS if e2e_unavailable_reason(p, CPU) is None]
TINY_VIT = EndToEndShape("tiny", num_members=3, rank=2, image_size=32, patch_size=16, num_layers=1, num_heads=2,
                         hidden_dim=16, mlp_dim=24, num_classes=5, infer_batch=1, train_batch=2)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("provider", OP_ON_CPU)
def test_op_provider_matches_reference(provider: str) -> None:
    shape = SMOKE_SHAPE
    inp = make_inputs(shape.num_members, shape.rows, shape.d, shape.k, shape.rank, lead=(shape.rows,), scaling=1.0)
    run = build_op_run(provider, inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                       seq_len=shape.seq_len)
    lora_B = torch.zeros_like(inp.lora_B) if provider == "limit" else inp.lora_B  # limit is the op without LoRA
    out = run.forward()
    assert_close_named("out", run.to_member_major(out),
                       lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, lora_B, 1.0), torch.float32)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, run.trainable, grad_out)
    ref = lora_ensemble_reference_backward(run.to_member_major(grad_out), inp.x, inp.weight, inp.lora_A, lora_B, 1.0)
    assert_close_named("dx", run.to_member_major(grads[0]), ref.x, torch.float32)
    for name, grad in zip(("lora_A", "lora_B"), grads[1:]):
        assert_close_named(f"d{name}", grad, getattr(ref, name), torch.float32)
    for mode in MODES:
        make_step(run, mode)()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_matches_reference_where_torch_runs_it(dtype: torch.dtype) -> None:
    """PyTorch's grouped GEMM baseline (base F.linear, grouped shrink and expand with member offsets)
    computes the op and its gradients, on sizes whose strides are 16-byte multiples; 3-D rows."""
    n, m, d, k, r = 3, 8, 16, 24, 8
    reason = provider_unavailable_reason("grouped_mm", CPU, dtype, OpShape("aligned", n, m, d, k, r))
    if reason is not None:
        pytest.skip(reason)
    inp = make_inputs(n, m, d, k, r, dtype=dtype, lead=(2, 4), scaling=0.5)
    run = build_op_run("grouped_mm", inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    out = run.forward()
    assert out.dtype == dtype
    assert_close_named("out", out, lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 0.5),
                       dtype)
    grad_out = torch.randn_like(out)
    ref = lora_ensemble_reference_backward(grad_out, inp.x, inp.weight, inp.lora_A, inp.lora_B, 0.5)
    for name, grad in zip(("x", "lora_A", "lora_B"), torch.autograd.grad(out, run.trainable, grad_out)):
        assert_close_named(f"d{name}", grad, getattr(ref, name), dtype)
    for mode in MODES:
        make_step(run, mode)()


def test_grouped_mm_refuses_unaligned_sizes_with_torchs_reason() -> None:
    if grouped_mm is None:
        pytest.skip(GROUPED_MM_MISSING)
    reason = provider_unavailable_reason("grouped_mm", CPU, torch.float32, SMOKE_SHAPE)
    assert reason is not None and "d=17, k=11, r=2" in reason and "float32" in reason, reason
    inp = make_inputs(3, 6, 17, 11, 2, scaling=1.0)
    with pytest.raises(RuntimeError, match="cannot run d=17, k=11, r=2"):
        build_op_run("grouped_mm", inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 1.0)


def test_training_step_peak_memory_counts_the_inputs() -> None:
    inp = make_inputs(2, 8, 32, 32, 4, scaling=1.0)
    step = make_step(build_op_run("bmm", inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 1.0), "fwd_bwd")
    memory = memory_peak(step, CPU)
    assert memory.before_bytes >= inp.x.numel() * inp.x.element_size()  # the step reads x: it is counted
    assert memory.peak_bytes - memory.before_bytes >= inp.x.numel() * inp.x.element_size()  # dx, at least


def test_timed_calls_flush_before_every_call_and_outside_its_events() -> None:
    log: list[str] = []

    class Event:  # "time" is the position in the log, in ms
        def record(self) -> None:
            log.append("record")
            self.at = len(log)

        def elapsed_time(self, end: Event) -> float:
            return float(end.at - self.at)

    times = timed_calls(lambda: log.append("call"), 3, lambda: log.append("flush"), Event, lambda: log.append("wait"))
    assert log == ["flush", "record", "call", "record"] * 3 + ["wait"]
    assert times == [0.002] * 3  # the call and the end event: 2 "ms" each, in seconds


def test_flush_is_larger_than_l2_and_device_calls_stay_in_bounds() -> None:
    assert flush_bytes(50 * 2**20) == MIN_FLUSH_BYTES  # H100: 50 MiB L2
    assert flush_bytes(None) >= 2 * 128 * 2**20  # L2 size not reported
    assert flush_bytes(300 * 2**20) == 600 * 2**20
    assert device_calls(1e-6) == MAX_DEVICE_CALLS and device_calls(1.0) == MIN_DEVICE_CALLS
    assert MIN_DEVICE_CALLS < device_calls(2e-3) < MAX_DEVICE_CALLS


def test_cpu_device_time_is_the_host_time() -> None:
    timing = device_time(lambda: None, CPU, once_s=1e-3, host_median_s=2e-3)
    assert (timing.seconds, timing.method, timing.flush_bytes) == (2e-3, "wall_clock", 0)
    assert timing.extra_info()["device_s"] == 2e-3


def test_forward_extra_bytes_name_the_xa_writes() -> None:
    n, m, r = 16, 50, 8
    assert forward_extra_bytes("triton", n, m, r, torch.bfloat16) == 4 * n * m * r
    assert forward_extra_bytes("bmm", n, m, r, torch.bfloat16) == 6 * n * m * r
    assert forward_extra_bytes("bmm", n, m, r, torch.float32) == 0
    assert all(forward_extra_bytes(p, n, m, r, torch.bfloat16) == 0
               for p in ("grouped_mm", "compiled", "vmap", "vmap_paper", "vmap_shared_w0", "sequential", "limit"))


def test_nvidia_smi_rows_are_parsed_by_field() -> None:
    text = ("GPU-1234, NVIDIA H100 80GB HBM3, 570.86, P0, 1980 MHz, 1980 MHz, 2619 MHz, 41, 120.50 W, 700.00 W\n"
            "garbage line\n")
    (row,) = parse_nvidia_smi_csv(text)
    assert row["uuid"] == "GPU-1234" and row["clocks.sm"] == "1980 MHz" and row["power.limit"] == "700.00 W"


@pytest.mark.parametrize("provider", E2E_ON_CPU)
def test_end_to_end_provider_runs(provider: str) -> None:
    shape = TINY_VIT
    n, b = shape.num_members, shape.train_batch
    images = torch.randn(n * b if provider == "limit" else b, 3, shape.image_size, shape.image_size)
    labels = torch.randint(0, shape.num_classes, (b,)).repeat(n)
    torch.manual_seed(1)
    run = build_e2e_run(provider, shape, CPU, torch.float32)
    logits = make_e2e_step(run, "e2e_infer", images, labels)()
    assert logits.shape == ((n * b,) if provider == "limit" else (n, b)) + (shape.num_classes,)
    assert torch.isfinite(logits).all()
    if provider in ("vmap", "vmap_shared_w0"):  # same seed: the same ensemble as bmm, run another way
        torch.manual_seed(1)
        bmm = build_e2e_run("bmm", shape, CPU, torch.float32)
        expected = make_e2e_step(bmm, "e2e_infer", images, labels)()
        assert_close_named("logits", logits, expected.double(), torch.float32)
    grads = make_e2e_step(run, "e2e_train", images, labels)()
    assert len(grads) >= 1 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_report_renders_committed_run(path: Path, tmp_path: Path) -> None:
    """Every committed JSON is a pytest-benchmark run that report.py renders, or a host-cost table of
    ``python -m benchmarks.bench_overhead --json`` with every provider in every mode."""
    data = json.loads(path.read_text())
    if "benchmarks" not in data:
        assert {"device", "torch", "results"} <= set(data) <= {"device", "torch", "triton", "date", "host",
                                                              "load", "results"}, (
            f"{path.name}: neither a benchmark run nor an overhead table")
        baseline = {"F.linear", "composite", "module[torch]", "functional[torch]"}
        for mode in OVERHEAD_MODES:
            times = data["results"][mode]
            assert baseline <= set(times) == set(data["results"][OVERHEAD_MODES[0]]), (mode, sorted(times))
            assert all(v > 0 for v in times.values()), times
        return
    markdown = report.render_markdown(data, path.stem)
    assert data["machine_info"]["torch"] in markdown
    for bench in data["benchmarks"]:
        assert f"| {bench['extra_info']['provider']} |" in markdown
    report.render_plot(data, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_sanitize_workload_runs_every_case_on_cpu() -> None:
    """The compute-sanitizer workload of the GPU pass: every edge shape, both layouts, forward and
    backward, all finite (torch backend in every dtype, the Triton interpreter in fp32)."""
    from benchmarks.sanitize_workload import DELTA_SHAPES, SHAPES, run_workload

    calls = 2 * (len(SHAPES) + len(DELTA_SHAPES))  # both layouts
    assert run_workload("torch", CPU, [torch.float32, torch.bfloat16]) == 2 * calls
    if "triton" in available_backends(CPU):
        assert run_workload("triton", CPU, [torch.float32]) == calls


def test_llm_providers_compute_the_same_members() -> None:
    """bench_llm's providers on the CPU shape: the ensemble's members and the peft adapters run one after
    another decode the same tokens and give the same answer probabilities; limit runs the plain model on
    N copies of the prompts."""
    pytest.importorskip("peft")
    from benchmarks.bench_llm import ANSWER_TOKENS, CPU_LLM, build_llm_run

    shape = CPU_LLM
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.prompt_len))
    runs = {p: build_llm_run(p, shape, CPU, torch.float32) for p in ("ensemble", "limit", "peft_sequential")}
    with torch.no_grad():
        tokens = {p: run.generate(ids) for p, run in runs.items()}
        probs = {p: run.predict(ids) for p, run in runs.items()}
    assert tokens["ensemble"].shape == (shape.num_members, shape.batch, shape.prompt_len + shape.new_tokens)
    assert torch.equal(tokens["ensemble"], tokens["peft_sequential"])
    assert tokens["limit"].shape == (shape.num_members * shape.batch, shape.prompt_len + shape.new_tokens)
    member_probs = probs["peft_sequential"]  # [N, B, answers]
    assert member_probs.shape == (shape.num_members, shape.batch, len(ANSWER_TOKENS))
    torch.testing.assert_close(probs["ensemble"], member_probs.mean(0), atol=1e-5, rtol=1e-5)


def test_triton_c_launch_reaches_the_stand_in_driver() -> None:
    """benchmarks/triton_c_launch.py times Triton's C launch against a stand-in libcuda.so.1: every timed
    call goes through argument parsing to cuLaunchKernelEx (counted by the stand-in). In a new process:
    the stand-in must not be the libcuda.so.1 of this one."""
    from benchmarks import triton_c_launch

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite runs interpreted
    with mock.patch.dict(os.environ, env, clear=True):
        reason = triton_c_launch.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run([sys.executable, "-m", "benchmarks.triton_c_launch", "--rounds", "2", "--calls", "5"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"C launch .*: \d+\.\d+ µs a launch", done.stdout), done.stdout
    assert "11 launches reached cuLaunchKernelEx" in done.stdout, done.stdout  # 1 warm-up + 2 rounds x 5


def test_first_forward_runs_each_variant_in_a_new_process(tmp_path: Path) -> None:
    from benchmarks import first_forward

    with mock.patch.object(first_forward, "STEPS", ("e2e_infer",)):
        assert first_forward.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "first_forward.json").read_text())["results"]
    assert [r["variant"] for r in results] == list(first_forward.VARIANTS)
    assert all(r["build_s"] > 0 and r["first_s"] > 0 and r["step_s"] > 0 for r in results)
    assert all(r["hash_wait_s"] == 0 for r in results)  # no hashing thread on the CPU
    assert "compiled ahead" in results[1]["ahead"] and 0 < results[1]["ahead_block_s"] <= results[1]["first_s"]
    assert "| e2e_infer | second |" in (tmp_path / "first_forward.md").read_text()
