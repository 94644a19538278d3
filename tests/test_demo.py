"""A fast smoke run of the demo (``python -m lora_ensemble.demo``): tiny epochs, big batches."""

from __future__ import annotations

import math

import torch

from lora_ensemble import demo


def test_splits_cover_the_digits_once_and_are_relabelled() -> None:
    splits = demo.load_digits_splits(seed=0)
    assert splits.pretrain[1].max() <= 4 and splits.pretrain[0].shape[1:] == (1, 8, 8)
    for images, labels in (splits.train, splits.val, splits.test):
        assert set(labels.tolist()) == {0, 1, 2, 3, 4}
        assert 0 <= images.min() and images.max() <= 1
    assert len(splits.train[0]) + len(splits.val[0]) + len(splits.test[0]) + len(splits.pretrain[0]) == 1797


def test_demo_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "reliability.png"
    args = demo.parse_args(["--pretrain-epochs", "1", "--finetune-epochs", "1", "--members", "2",
                            "--batch-size", "256", "--out", str(out)])
    results = demo.run(args)
    assert [r.name.split(" ")[0] for r in results] == ["Single", "Single", "Single", "LoRA-Ensemble"]
    labels = demo.load_digits_splits(args.seed).test[1]
    for result in results:
        assert result.probs.shape == (len(labels), 5)
        torch.testing.assert_close(result.probs.sum(-1), torch.ones(len(labels), dtype=result.probs.dtype))
        assert all(math.isfinite(v) for v in result.row(labels).values())
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ECE" in printed and "Brier" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
