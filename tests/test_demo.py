"""The digits demo (``python -m lora_ensemble.demo``): a fast smoke run (tiny epochs, big batches), its
--help, and the README's table against a run at the README's settings."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch

from lora_ensemble import demo

from .utils import cpu_is_the_readmes

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# the rows of the README's digits table (the demo's results in order) and its columns (Result.row's keys)
README_ROWS = ("single model", "single model + temperature scaling", "single LoRA", "LoRA-Ensemble, 8 members")
README_COLUMNS = ("accuracy", "confidence", "ece", "nll", "brier")


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


def test_help_lists_every_task_and_its_options_in_plain_text(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        demo.main(["--help"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    from lora_ensemble.demo_mcqa import build_parser as mcqa_parser

    for task, parser in (("digits", demo.build_parser()), ("mcqa", mcqa_parser())):
        assert f"--task {task}" in printed
        for action in parser._actions:
            assert all(option in printed for option in action.option_strings), action.option_strings
            assert action.help, f"--task {task}: {action.option_strings} has no help"
    assert "``" not in printed and ":mod:" not in printed and ":func:" not in printed


def test_help_of_one_task_shows_that_task(capsys) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--task", "mcqa", "--help"])
    printed = capsys.readouterr().out
    assert "--pretrain-sequences" in printed and "--lr-full" not in printed and "``" not in printed


def readme_demo_section() -> str:
    text = README.read_text()
    return text[text.index("## Demo: calibration"):text.index("### Multiple-choice QA")]


def test_the_readme_table_is_what_the_demo_prints(tmp_path) -> None:
    """The README's digits table, regenerated: the demo at the README's command (the defaults: about one
    CPU-minute), every number to the 4 decimals shown. Run where the README says the table was made (its
    torch version; elsewhere it skips); on a CPU of another vendor than the README names only the
    single-model rows are compared: the LoRA rows move there (the fine-tunes amplify the last-bit
    differences of the CPU's BLAS kernels)."""
    section = readme_demo_section()
    assert "```bash\npython -m lora_ensemble.demo --out reliability.png\n```" in section
    made_with = re.search(r"torch (\d+\.\d+\.\d+)", section).group(1)
    if torch.__version__.split("+")[0] != made_with:
        pytest.skip(f"the README's demo table was made with torch {made_with}, this is torch {torch.__version__}")
    args = demo.parse_args(["--out", str(tmp_path / "reliability.png")])
    results = demo.run(args)
    labels = demo.load_digits_splits(args.seed).test[1]
    rows = []
    for name, result in zip(README_ROWS, results, strict=True):
        row = result.row(labels)
        rows.append(f"| {name} | " + " | ".join(f"{row[key]:.4f}" for key in README_COLUMNS) + " |")
    if not cpu_is_the_readmes(section):
        rows = rows[:2]  # the single model, without and with temperature scaling
    table = "\n".join(rows)
    assert table in section, f"README.md's demo table is not what the demo prints now; the rows now:\n{table}"
