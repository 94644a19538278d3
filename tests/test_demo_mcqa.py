"""A fast smoke run of the multiple-choice demo (``python -m lora_ensemble.demo --task mcqa``)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from lora_ensemble import demo, demo_mcqa

from .utils import cpu_is_the_readmes


def test_questions_name_the_right_option() -> None:
    generator = torch.Generator().manual_seed(0)
    world = demo_mcqa.World.draw(generator)
    asked = torch.tensor([3, 7])
    ids, answers = demo_mcqa.make_questions(world, demo_mcqa.SIZE, 50, generator, asked)
    assert ids.shape == (50, 14) and set(ids[:, 2].tolist()) <= {3, 7}
    option_values = ids[torch.arange(50), 6 + 2 * answers] - demo_mcqa._VALUE0[demo_mcqa.SIZE]
    assert torch.equal(option_values, world.values[demo_mcqa.SIZE, ids[:, 2]])
    assert demo_mcqa.render(ids[0]).startswith("Q e") and demo_mcqa.render(ids[0]).endswith("Answer:")
    facts = demo_mcqa.make_facts(world, 4, 3, generator)
    assert facts.shape == (4, 13) and (facts[:, 4::4] == demo_mcqa.SEP).all()


def test_mcqa_demo_smoke(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "mcqa.png"
    seen = {}
    monkeypatch.setattr(demo_mcqa, "run", lambda args: seen.setdefault("args", args))
    demo.main(["--task", "mcqa", "--members", "3"])  # the dispatch of python -m lora_ensemble.demo
    assert seen["args"].members == 3
    monkeypatch.undo()
    args = demo_mcqa.parse_args(["--members", "2", "--pretrain-sequences", "64", "--pretrain-epochs", "1",
                                 "--train-questions", "32", "--finetune-epochs", "1", "--test-questions", "40",
                                 "--timing-questions", "2", "--decode-tokens", "2", "--out", str(out)])
    result = demo_mcqa.run(args)
    assert [s.id.member_probs.shape for s in result.scores] == [(1, 40, 4), (2, 40, 4), (2, 40, 4)]
    # the members as peft adapters run in turn predict what the fused ensemble predicts
    torch.testing.assert_close(result.scores[2].id.member_probs, result.scores[1].id.member_probs)
    assert [r["model"] for r in result.quality] == ["single LoRA", "LoRA-Ensemble (2), fused",
                                                    "LoRA-Ensemble (2), peft adapters in turn"]
    assert math.isnan(result.quality[0]["error_mi"]) and all(math.isfinite(r["ood_entropy"]) for r in result.quality)
    assert result.cost[0]["question_ratio"] == 1.0 and all(r["peak_bytes"] > 0 for r in result.cost)
    printed = capsys.readouterr().out
    assert "| model | accuracy | ECE-15 |" in printed and "| model (CPU, batch 1) |" in printed
    assert result.tables in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table(text: str, header: str) -> str:
    """The Markdown table that starts with the line ``header`` in ``text``."""
    lines = text[text.index(header):].splitlines()
    return "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("|"))])


def test_readme_mcqa_table_is_what_the_demo_prints(capsys) -> None:
    """README's MCQA quality table is the demo's output at its defaults (seed 0, one thread): regenerate
    it with ``python -m lora_ensemble.demo --task mcqa`` when the code changes what it prints. (The cost
    table beside it is a measurement: ``benchmarks/results/cpu-mcqa.md``, not compared.) On another torch
    than the README names the fine-tunes' last bits differ and the table moves, so it skips; on a CPU of
    another vendor than it names, the same (the fine-tunes amplify the last-bit differences of the CPU's
    BLAS kernels): there the fused ensemble's row must equal the peft adapters' row, as everywhere."""
    readme_text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = "| model | accuracy | ECE-15 |"
    section = readme_text[:readme_text.index(header)].rsplit("###", 1)[-1]
    made_with = re.search(r"torch (\d+\.\d+\.\d+)", section)
    assert made_with, "README's MCQA section must name the torch version its table was made with"
    if torch.__version__.split("+")[0] != made_with.group(1):
        pytest.skip(f"README's MCQA table was made with torch {made_with.group(1)}, this is torch {torch.__version__}")
    threads = torch.get_num_threads()
    try:
        demo.main(["--task", "mcqa", "--timing-questions", "1", "--decode-tokens", "1",
                   "--out", os.devnull])  # the cost table is not compared: time it as little as possible
    finally:
        torch.set_num_threads(threads)
    printed = _table(capsys.readouterr().out, header)
    fused, in_turn = (row.split("|")[2:] for row in printed.splitlines()[3:5])
    assert fused == in_turn, f"the fused ensemble and the peft adapters in turn score differently:\n{printed}"
    if cpu_is_the_readmes(section):
        readme = _table(readme_text, header)
        assert readme == printed, f"README's MCQA table differs from what the demo prints now:\n{printed}"
