"""The README's quickstart and evaluation example run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    exec(compile(code, "README quickstart", "exec"), {})
    assert "torch.Size([8, 10, 32]) True" in capsys.readouterr().out


def test_evaluating_an_ensemble_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    code = re.search(r"## Evaluating an ensemble\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README evaluating an ensemble", "exec"), {})
    assert "'samples': 100, 'skipped': 0}" in capsys.readouterr().out
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close("all")


def test_peft_adapters_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    code = re.search(r"### peft adapters\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README peft adapters", "exec"), scope)
    assert capsys.readouterr().out.strip() == "True"
    assert scope["seqs"].shape == (4, 2, 20) and scope["pred"].mean_probs.shape == (2, 4)
    assert [pathlib.Path(f).name for f in scope["folders"]] == [f"member_{n}" for n in range(4)]
