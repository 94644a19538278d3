"""The MCQA table on this machine: ``python -m benchmarks.bench_mcqa [--device cuda] [--out FILE.md]``.

Runs the multiple-choice demo (:mod:`lora_ensemble.demo_mcqa`; its defaults, seed 0, one CPU thread;
the models are trained on the CPU and scored and timed on ``--device``) and writes its two tables
(quality; cost of a question and of a decoded token, peak memory, ratios to the single model) for the
single LoRA, the fused LoRA-Ensemble and the same members as peft adapters run one after another, with
the device, the software stack and the date, and the demo's ROC curves next to it (``.png``). The CPU
table is committed as ``benchmarks/results/cpu-mcqa.md``; ``--device cuda`` writes ``cuda-mcqa.md``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

from lora_ensemble import demo_mcqa

from .machine import device_name

__all__ = ["main"]


def stack() -> str:
    """The software versions the table depends on."""
    import peft
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="the Markdown file (default benchmarks/results/<cpu|cuda>-mcqa.md)")
    args, demo_argv = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    demo_args = demo_mcqa.parse_args(demo_argv)
    device = torch.device(demo_args.device)
    out = Path(args.out or Path(__file__).parent / "results" / f"{device.type}-mcqa.md")
    demo_args.out = str(out.with_suffix(".png"))  # the demo's ROC curves next to the table
    result = demo_mcqa.run(demo_args)
    where = "CUDA" if device.type == "cuda" else "CPU"
    command = " ".join(["python -m benchmarks.bench_mcqa", *(argv if argv is not None else sys.argv[1:])])
    out.write_text(
        f"# Multiple-choice QA: fused LoRA-Ensemble, the same adapters in turn, one model ({where})\n\n"
        f"`{command}` (the demo `python -m lora_ensemble.demo --task mcqa` with its defaults, seed 0).\n\n"
        f"Device: {device_name(device)}; {stack()}; date {datetime.date.today().isoformat()}. "
        f"{demo_args.members} members of rank {demo_args.rank} on a 3-layer GPT-2 (d=64); cost measured one "
        "question at a time, best of 5 runs; peak memory on the CPU = weights and adapters + the peak of the "
        "tensors alive while answering one question (`lora_ensemble.cost`), on CUDA the allocator's peak.\n\n"
        f"{result.tables}\n")
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    main()
