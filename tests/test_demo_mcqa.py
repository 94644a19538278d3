"""A fast smoke run of the multiple-choice demo (``python -m lora_ensemble.demo --task mcqa``)."""

from __future__ import annotations

import math

import torch

from lora_ensemble import demo, demo_mcqa


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
                                 "--out", str(out)])
    scores = demo_mcqa.run(args)
    assert [s.id.member_probs.shape for s in scores] == [(1, 40, 4), (2, 40, 4)]
    rows = demo_mcqa.score_rows(scores)
    assert [r["score"] for r in rows] == ["entropy", "entropy", "mutual information"]
    assert all(math.isfinite(r["ood_vs_id"]) for r in rows)
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "mutual information" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
