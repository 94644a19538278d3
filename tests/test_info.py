"""``python -m lora_ensemble.info``: the report, and the self-test against float64 (really run on the
CPU: the torch backend in every dtype, Triton under the interpreter), which must fail a backend that
computes a wrong result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ensemble import available_backends, backend_torch, info
from lora_ensemble.info import INTERPRETER_BF16, CheckCase, check, format_check, main
from lora_ensemble.reference import relative_error

ROOT = Path(__file__).resolve().parents[1]
TINY = (CheckCase("tiny", "linear", 2, 3, 8, 12, 2), CheckCase("tiny delta", "delta", 2, 3, 8, 12, 2))


def test_cli_reports_the_machine_and_checks_the_torch_backend(tmp_path: Path) -> None:
    out = tmp_path / "info.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lora_ensemble.info", "--check", "--backend", "torch", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    for words in (f"torch {torch.__version__}", "triton ", "driver: ", "extension lora_ensemble._C", "backends",
                  'auto (what backend="auto" picks, and why)', "per-shape choice", "check against float64"):
        assert words in text, f"{words!r} missing from:\n{text}"
    for name in ("torch", "triton", "cuda"):
        assert any(line.split()[:2] == [name, "cpu"] for line in text.splitlines()), f"backend {name} not listed"
    rows = json.loads(out.read_text())["check"]
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    combos = {(r["dtype"], r["layout"], r["case"]) for r in rows}
    assert len(rows) == len(combos) == 3 * 2 * len(info.CHECK_CASES), rows
    assert all(r["backend"] == "torch" and r["device"] == device and r["status"] == "PASS" for r in rows), rows
    assert {name for r in rows for name in r["errors"]} == {"out", "dx", "dA", "dB", "dbase"}
    assert {c.rows for c in info.CHECK_CASES} >= {1}, "one case must have one row per member"


def test_auto_choice_names_its_rule_on_the_cpu() -> None:
    choice = info.auto_choice(torch.device("cpu"), torch.bfloat16)
    assert (choice.backend, choice.dtype) == ("torch", "bfloat16") and "off the GPU" in choice.why


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs TRITON_INTERPRET=1 without a GPU")
def test_triton_runs_under_the_interpreter_and_skips_bf16_with_the_reason() -> None:
    rows = check("cpu", ["triton"], [torch.float32, torch.bfloat16], TINY)
    assert len(rows) == 2 * 2 * len(TINY)
    for row in rows:
        if row.dtype == "float32":
            assert row.status == "PASS" and set(row.errors) >= {"out", "dx", "dA", "dB"}, row
        else:
            assert (row.status, row.note, row.errors) == ("SKIP", INTERPRETER_BF16, {}), row


def test_a_backend_that_cannot_run_gives_skip_rows_with_its_reason() -> None:
    rows = check("cpu", ["cuda"], [torch.float32], TINY[:1])
    assert [row.status for row in rows] == ["SKIP", "SKIP"]
    assert all("CUDA" in row.note for row in rows), rows


def test_a_wrong_backward_fails_and_the_cli_exits_1(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    right = backend_torch.backward_dx

    def off_by_a_bit(*args, **kwargs):
        dx, dyb = right(*args, **kwargs)
        return dx * 1.01, dyb  # 1% off: a thousand times float32's bound

    monkeypatch.setattr(backend_torch, "backward_dx", off_by_a_bit)
    assert main(["--check", "--backend", "torch", "--dtype", "float32"]) == 1
    table = capsys.readouterr().out
    failing = [line for line in table.splitlines() if line.startswith("torch ") and line.endswith("FAIL")]
    assert len(failing) == 2 * len(info.CHECK_CASES), table
    rows = check("cpu", ["torch"], [torch.float32], TINY)
    assert all(row.status == "FAIL" and row.errors["dx"] > row.bound >= row.errors["out"] for row in rows), rows


def test_a_crashing_backend_is_an_error_row_and_the_check_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("kernel launch failed: an illegal memory access")

    monkeypatch.setattr(backend_torch, "forward", crash)
    rows = check("cpu", ["torch"], [torch.float32, torch.float16], TINY)
    assert len(rows) == 2 * 2 * len(TINY)
    assert all(row.status == "ERROR" and "illegal memory access" in row.note for row in rows), rows
    assert format_check(rows).splitlines()[-1] == f"0 PASS, 0 FAIL, {len(rows)} ERROR, 0 SKIP"


def test_relative_error_is_the_rounding_of_each_element_whatever_its_size() -> None:
    want = torch.randn(1000, dtype=torch.float64) * torch.logspace(-3, 3, 1000, dtype=torch.float64)
    assert relative_error(want.float(), want) <= 2**-24
    assert relative_error(want.bfloat16(), want) <= 2**-8
    assert 5e-4 < relative_error(want * (1 + 1e-3), want) <= 1e-3  # 1e-3 at the elements far above the RMS
    tiny = want.clone()
    tiny[0] = 0.0  # an exact zero is measured against the RMS, not against itself
    assert relative_error(tiny + 1e-12, tiny) < 1e-12
    broken = want.clone()
    broken[7] = float("nan")
    assert relative_error(broken, want) != relative_error(broken, want)  # NaN
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(want[:3], want[:4])
