"""Every python block of the README runs as written: offline, in a fresh namespace, from an empty directory.

A block is named by the heading above it (``"heading #2"`` for the second block under one heading).
``BLOCK_TESTS`` names the test that runs each block, and ``test_every_python_block_is_run`` fails when
the README gains, loses or reorders a python block, so a new example cannot go untested. GPU-only blocks
run as ``gpu`` tests; the member-parallel script runs under torchrun with two CPU processes (gloo).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_FENCES = {"python", "py", "python3", "pycon"}

# the README's python blocks, in order -> the test below that runs each
BLOCK_TESTS = {
    "Quickstart": "test_quickstart_runs",
    "Backends": "test_compiling_ahead_runs",
    "Wrapping a model (LoRA-Ensemble)": "test_wrapping_a_model_runs",
    "fp32 adapters on a bf16 base, quantized bases": "test_fp32_adapters_on_a_bf16_base_runs",
    "Evaluating an ensemble": "test_evaluating_an_ensemble_runs",
    "LLMs": "test_llm_example_runs",
    "peft adapters": "test_peft_adapters_example_runs",
    "torch.compile, CUDA graphs, autocast, checkpointing": "test_compile_autocast_checkpointing_runs",
    "torch.compile, CUDA graphs, autocast, checkpointing #2": "test_cuda_graphs_example_runs",
    "Distributed: DDP, FSDP2, member parallelism": "test_member_parallelism_runs_under_torchrun",
}


@dataclass(frozen=True)
class Block:
    name: str
    code: str


def python_blocks() -> list[Block]:
    """The README's fenced python blocks in order, each named by the heading above it."""
    blocks: list[Block] = []
    heading, fence, body = "", None, []
    for line in README.read_text().splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, body = line[3:].strip(), []
        elif fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif fence is not None and line.startswith("```"):
            if fence in PYTHON_FENCES:
                count = sum(b.name.split(" #")[0] == heading for b in blocks)
                blocks.append(Block(heading if count == 0 else f"{heading} #{count + 1}", "".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def block_code(name: str) -> str:
    """The code of the README's python block ``name``."""
    return {block.name: block.code for block in python_blocks()}[name]


def run_block(name: str, directory: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Execute the block ``name`` from ``directory`` in a fresh namespace; returns that namespace."""
    monkeypatch.chdir(directory)
    scope: dict = {"__name__": "__main__"}
    exec(compile(block_code(name), f"README.md: {name}", "exec"), scope)
    return scope


def test_every_python_block_is_run() -> None:
    assert [block.name for block in python_blocks()] == list(BLOCK_TESTS), (
        "the README's python blocks changed: give each a test here and list it in BLOCK_TESTS")
    missing = [test for test in BLOCK_TESTS.values() if not callable(globals().get(test))]
    assert not missing, f"BLOCK_TESTS names tests that do not exist: {missing}"


def test_quickstart_runs(tmp_path, monkeypatch, capsys) -> None:
    assert len(block_code("Quickstart").strip().splitlines()) <= 10
    run_block("Quickstart", tmp_path, monkeypatch)
    assert "torch.Size([8, 10, 32]) True" in capsys.readouterr().out


def test_compiling_ahead_runs(tmp_path, monkeypatch, capsys) -> None:
    scope = run_block("Backends", tmp_path, monkeypatch)
    assert capsys.readouterr().out.startswith("compiled ahead: ")
    assert scope["y"].shape == (4, 10, 32) and torch.isfinite(scope["y"]).all()


def test_wrapping_a_model_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("timm")
    scope = run_block("Wrapping a model (LoRA-Ensemble)", tmp_path, monkeypatch)
    assert capsys.readouterr().out.strip() == "torch.Size([4, 2, 10]) torch.Size([2, 10])"
    saved, loaded = scope["ensemble"].member_parameters(), scope["again"].member_parameters()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert type(scope["member0"]).__name__ == "VisionTransformer"


def test_fp32_adapters_on_a_bf16_base_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    scope = run_block("fp32 adapters on a bf16 base, quantized bases", tmp_path, monkeypatch)
    assert capsys.readouterr().out.strip() == "torch.bfloat16 torch.float32 torch.float32"
    assert scope["q_proj"].lora_B.grad.abs().sum() > 0


def test_evaluating_an_ensemble_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("timm")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_block("Evaluating an ensemble", tmp_path, monkeypatch)
    assert "'samples': 100, 'skipped': 0}" in capsys.readouterr().out
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close("all")


def test_llm_example_runs(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    scope = run_block("LLMs", tmp_path, monkeypatch)
    assert scope["logits"].shape == scope["out"].logits.shape == (5, 2, 12, 100)
    assert scope["pred"].mean_probs.shape == (2, 4) and scope["pred"].mutual_information.shape == (2,)
    assert scope["seqs"].shape == (5, 2, 20) and scope["seq"].shape == (2, 20)


def test_peft_adapters_example_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("peft")
    scope = run_block("peft adapters", tmp_path, monkeypatch)
    assert capsys.readouterr().out.strip() == "True"
    assert scope["seqs"].shape == (4, 2, 20) and scope["pred"].mean_probs.shape == (2, 4)
    assert [pathlib.Path(f).name for f in scope["folders"]] == [f"member_{n}" for n in range(4)]


def test_compile_autocast_checkpointing_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("timm")
    torch._dynamo.reset()
    scope = run_block("torch.compile, CUDA graphs, autocast, checkpointing", tmp_path, monkeypatch)
    assert capsys.readouterr().out.strip() == "torch.bfloat16 torch.Size([8, 17, 64])"
    assert scope["tokens"].grad is not None
    assert all(p.grad is not None for p in scope["ensemble"].member_parameters().values())


@pytest.mark.gpu
def test_cuda_graphs_example_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("timm")
    torch._dynamo.reset()
    run_block("torch.compile, CUDA graphs, autocast, checkpointing #2", tmp_path, monkeypatch)
    assert capsys.readouterr().out.split() == ["True", "torch.bfloat16"]


def test_member_parallelism_runs_under_torchrun(tmp_path) -> None:
    """The block is a script: torchrun starts it in two CPU processes (gloo), as its first line says."""
    pytest.importorskip("timm")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with gloo")
    code = block_code("Distributed: DDP, FSDP2, member parallelism")
    assert code.startswith("# train.py, run as: torchrun --nproc-per-node=2 train.py")
    (tmp_path / "train.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}  # CPU processes with gloo, also on a machine with one GPU
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the two processes share one stdout pipe, so one's line may land inside the other's: find, not split
    lines = sorted(re.findall(r"rank \d: members slice\(\d+, \d+, None\), mean_probs \(\d+, \d+\)", done.stdout))
    assert lines == ["rank 0: members slice(0, 8, None), mean_probs (8, 10)",
                     "rank 1: members slice(8, 16, None), mean_probs (8, 10)"], done.stdout
