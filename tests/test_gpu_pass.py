"""The GPU pass (benchmarks/gpu_pass.py), checked on a CPU: its parts fit their budgets on paper, cover
the checklist, name tests that exist, enforce each step's budget, and run end to end in smoke mode
(the same code paths, GPU-only steps skipped with a reason or run small), leaving three files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_pass
from benchmarks.gpu_pass import FAST_PARTS, LONG_PARTS, PART_BUDGET_S, Step, part_budget_s, run_stages, stages_for

ROOT = Path(__file__).resolve().parents[1]


def _commands(part: str, logs: Path) -> dict[str, str]:
    return {step.name: " ".join(step.command) for stage in stages_for(part, logs, "9.0") for step in stage}


def test_parts_fit_their_budgets_build_included(tmp_path: Path) -> None:
    """first <= 480 s and second <= 180 s with every stage at its longest step (the build of first
    included); the long parts stop within a 10-minute command."""
    assert PART_BUDGET_S["first"] <= 480 and PART_BUDGET_S["second"] <= 180
    for part in FAST_PARTS:
        stages = stages_for(part, tmp_path)
        assert part_budget_s(stages) <= PART_BUDGET_S[part], part
        assert all(step.budget_s > 0 for stage in stages for step in stage)
    assert any(step.name == "build" for stage in stages_for("first", tmp_path) for step in stage)
    for part in LONG_PARTS:
        assert gpu_pass.part_deadline_s(part, stages_for(part, tmp_path)) < 600, part


def test_first_and_second_cover_the_checklist(tmp_path: Path) -> None:
    first = {step.name: step for stage in stages_for("first", tmp_path, "9.0") for step in stage}
    commands = _commands("first", tmp_path)
    assert first["build"].env["TORCH_CUDA_ARCH_LIST"] == "9.0" and "--no-index" in commands["build"]
    build_stage = next(stage for stage in stages_for("first", tmp_path) if any(s.name == "build" for s in stage))
    assert "triton_tests" in {s.name for s in build_stage}, "the Triton tests run beside the build"
    assert first["triton_tests"].env == {"LORA_ENSEMBLE_TRITON_AUTOTUNE": "0"}
    assert "lora_ensemble.info --check" in commands["info_check"] and "--backend cuda" in commands["info_check"]
    for dtype in ("float32", "float16", "bfloat16"):
        assert f"--backend triton --dtype {dtype}" in commands[f"info_check_triton_{dtype}"]
    assert "tests/test_cuda_backend.py -m gpu" in commands["cuda_tests"]
    assert "--tool memcheck" in commands["memcheck_cuda"] and "--backend cuda" in commands["memcheck_cuda"]
    assert "benchmarks.headline" in commands["headline"]
    second = _commands("second", tmp_path)
    assert "--tool racecheck" in second["racecheck_cuda"] and "--backend cuda" in second["racecheck_cuda"]
    assert "--tool memcheck" in second["memcheck_triton"] and "--backend triton" in second["memcheck_triton"]
    assert "test_compile_autocast.py -m gpu" in second["compile_tests"]
    assert "test_robustness.py -m gpu" in second["robustness"]
    for part in FAST_PARTS + LONG_PARTS:
        for stage in stages_for(part, tmp_path):
            for step in stage:
                assert step.gpu_only is None or step.gpu_only, (part, step.name)


@pytest.mark.parametrize(("terms", "path"), [(gpu_pass.TRITON_TESTS, "tests/test_triton_backend.py"),
                                             (gpu_pass.COMPILE_TESTS, "tests/test_compile_autocast.py")])
def test_test_selections_name_tests_that_exist(terms: tuple[str, ...], path: str) -> None:
    names = re.findall(r"^def (test_\w+)", (ROOT / path).read_text(), flags=re.MULTILINE)
    for term in terms:
        assert any(term in name for name in names), f"-k {term!r} selects no test of {path}"


def test_each_step_is_stopped_at_its_budget_and_a_stage_runs_together(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_pass, "KILL_GRACE_S", 1)
    sleep = (sys.executable, "-c", "import time; time.sleep(60)")
    deaf = (sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)")
    stages = [(Step("sleeper", sleep, 2), Step("deaf", deaf, 2), Step("quick", (sys.executable, "-c", "print(1)"), 5)),
              (Step("gpu", ("false",), 5, gpu_only="needs a GPU"),
               Step("stand_in", ("false",), 5, gpu_only="needs a GPU", smoke=(sys.executable, "-c", "print(2)")))]
    start = time.monotonic()
    results = {r.name: r for r in run_stages(stages, tmp_path, smoke=True, deadline=start + 60)}
    assert time.monotonic() - start < 15, "the stage's steps did not run at the same time, or were not stopped"
    for name in ("sleeper", "deaf"):
        assert results[name].timed_out and results[name].rc != 0 and not results[name].ok, results[name]
    assert results["quick"].rc == 0 and results["stand_in"].rc == 0
    assert results["gpu"].rc is None and results["gpu"].ok and "needs a GPU" in results["gpu"].note
    assert (tmp_path / "stand_in.log").read_text().splitlines()[-1] == "2"


def test_steps_past_the_parts_deadline_do_not_run(tmp_path: Path) -> None:
    step = Step("late", (sys.executable, "-c", "print(1)"), 60)
    (result,) = run_stages([(step,)], tmp_path, smoke=False, deadline=time.monotonic() + 1)
    assert result.rc is None and not result.ok and "out of time" in result.note


def test_steps_that_need_the_extension_wait_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without usable CUDA kernels the build runs and the CUDA steps are reported as not run; with
    them the build is skipped as needless."""
    quick = (sys.executable, "-c", "print(1)")
    stages = [(Step("build", quick, 5, unless_built=True),), (Step("cuda_tests", quick, 5, needs_extension=True),)]
    monkeypatch.setattr(gpu_pass, "extension_problem", lambda: "no kernels for this GPU")
    build, cuda = run_stages(stages, tmp_path, smoke=False, deadline=time.monotonic() + 60)
    assert build.rc == 0 and cuda.rc is None and not cuda.ok and "no kernels for this GPU" in cuda.note
    monkeypatch.setattr(gpu_pass, "extension_problem", lambda: None)
    build, cuda = run_stages(stages, tmp_path, smoke=False, deadline=time.monotonic() + 60)
    assert build.rc is None and build.ok and "extension is built" in build.note and cuda.rc == 0


def test_list_prints_every_part_with_its_budget(capsys: pytest.CaptureFixture) -> None:
    assert gpu_pass.main(["--list"]) == 0
    text = capsys.readouterr().out
    for part in FAST_PARTS + LONG_PARTS:
        assert f"[{part}] stages' budgets sum to" in text, part
    assert "--smoke:" in text


def test_first_part_runs_in_smoke_mode_and_leaves_three_files(tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_pass", "--part", "first", "--smoke", "--out", str(out),
                           "--logs", str(logs)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["first.md", "logs-first.tar.gz", "summary-first.json"]
    summary = json.loads((out / "summary-first.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["build"]["rc"] is None and "smoke run on a CPU" in steps["build"]["note"]
    for name in ("triton_tests", "info_check", "cuda_tests", "memcheck_cuda", "headline"):
        assert steps[name]["rc"] == 0, steps[name]
    assert summary["info_check"] and all(r["status"] == "PASS" for r in summary["info_check"])
    measured = [r for r in summary["headline"]["rows"] if r["provider"] in ("bmm", "grouped_mm", "limit")]
    assert measured and all(r["device_s"] > 0 and r["failed"] is None for r in measured), measured
    assert all(r["error"] < 1e-5 for r in measured if r["provider"] != "limit")
    assert {r["provider"] for r in summary["headline"]["rows"] if r["skipped"]} == {"triton", "cuda"}
    with tarfile.open(out / "logs-first.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs-first/info_check.log", "logs-first/headline.json", "logs-first/memcheck_cuda.log"} <= names
    assert done.stdout.rstrip().endswith("|"), "the tables come last"
    assert "## headline" in done.stdout and "## info --check" in done.stdout
