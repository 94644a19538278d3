"""LoRA-Ensemble end to end on scikit-learn's digits: ``python -m lora_ensemble.demo``.

Needs no download and no GPU (the digits ship with scikit-learn). The steps:

1. Pre-train a small vision transformer (8x8 images, 2x2 patches, 4 blocks) on the digits 0-4.
2. Fine-tune it on the unseen digits 5-9 (a small training split), three ways, each with a fresh head:
   a single model (every weight trained), a single LoRA model (LoRA on each block's ``qkv`` and
   ``proj``, backbone frozen) and a LoRA-Ensemble of ``--members`` such members.
3. Evaluate on a held-out test split: accuracy, ECE (15 bins), NLL and Brier, plus the single model
   after temperature scaling fitted on a validation split; print the table and write a
   reliability diagram to ``--out``.

The defaults take under one CPU-minute (49 s of user time on one thread of an AMD EPYC);
``--pretrain-epochs`` / ``--finetune-epochs`` / ``--members`` make longer runs. Everything is seeded
(``--seed``), and torch runs on ``--threads`` threads (default 1): the LoRA fine-tunes amplify the
last-bit differences between thread counts into different LoRA rows, so a table reproduces only at
the same thread count (and the same torch).
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics
from ._optional import optional_dependency
from .ensemble import LoRAEnsemble
from .plotting import reliability_diagram

with optional_dependency("python -m lora_ensemble.demo"):  # checked before anything runs
    import matplotlib
    from sklearn.datasets import load_digits
    from tqdm import tqdm

__all__ = ["DigitsSplits", "TinyViT", "build_parser", "load_digits_splits", "main", "run"]

# --task -> what it demonstrates (for --help)
TASKS = {
    "digits": "calibration: a LoRA-Ensemble of a small ViT on scikit-learn's digits (the default)",
    "mcqa": "multiple-choice QA uncertainty: a LoRA-Ensemble of a tiny GPT-2 (lora_ensemble.demo_mcqa)",
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer: ``[B, 1, 8, 8]`` images -> ``[B, num_classes]`` logits (class token)."""

    def __init__(self, num_classes: int, image_size: int = 8, patch_size: int = 2, dim: int = 64,
                 depth: int = 4, num_heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch_size) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@dataclass
class DigitsSplits:
    """Images ``[n, 1, 8, 8]`` in [0, 1] and labels ``[n]`` for each split. The pre-training split
    holds the digits 0-4; the fine-tuning splits hold the digits 5-9, relabelled 0-4."""

    pretrain: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_digits_splits(seed: int, train_size: int = 300, val_size: int = 150) -> DigitsSplits:
    """scikit-learn's 1797 digits, split by class (0-4 pre-train, 5-9 fine-tune) and then at random."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    source = (labels < 5).nonzero().squeeze(1)
    target = (labels >= 5).nonzero().squeeze(1)
    target = target[torch.randperm(len(target), generator=generator)]
    parts = target[:train_size], target[train_size:train_size + val_size], target[train_size + val_size:]
    return DigitsSplits(pretrain=(images[source], labels[source]),
                        train=(images[parts[0]], labels[parts[0]] - 5),
                        val=(images[parts[1]], labels[parts[1]] - 5),
                        test=(images[parts[2]], labels[parts[2]] - 5))


def train(model: nn.Module, data: tuple[Tensor, Tensor], epochs: int, lr: float, batch_size: int,
          loss_fn: Callable[[Tensor, Tensor], Tensor], desc: str, seed: int) -> float:
    """AdamW with a cosine schedule over shuffled mini-batches; returns the wall time in seconds."""
    images, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=True) as bar:
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = loss_fn(model(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    model.eval()
    return time.perf_counter() - start


def ensemble_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every member on the same batch (the paper's training): ``[N, B, C]``."""
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))


@torch.no_grad()
def member_logits(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits ``[N, B, C]`` (``N = 1`` for a plain model) over ``images`` in eval mode."""
    model.eval()
    outs = [model(chunk) for chunk in images.split(batch_size)]
    logits = torch.cat(outs, dim=-2)
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


@dataclass
class Result:
    name: str
    trained_params: int
    seconds: float
    probs: Tensor

    def row(self, labels: Tensor) -> dict[str, float]:
        return {
            "accuracy": metrics.accuracy(self.probs, labels).item(),
            "confidence": self.probs.max(dim=-1).values.mean().item(),
            "ece": metrics.expected_calibration_error(self.probs, labels).item(),
            "nll": metrics.negative_log_likelihood(self.probs, labels).item(),
            "brier": metrics.brier_score(self.probs, labels).item(),
        }


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def format_table(results: list[Result], labels: Tensor) -> str:
    """A plain-text table: one row per model, accuracy / mean confidence / ECE / NLL / Brier on ``labels``."""
    header = (f"{'model':<40} {'trained params':>14} {'train s':>8} {'accuracy':>9} {'mean conf.':>10} "
              f"{'ECE':>7} {'NLL':>7} {'Brier':>7}")
    lines = [header, "-" * len(header)]
    for result in results:
        r = result.row(labels)
        lines.append(f"{result.name:<40} {result.trained_params:>14,} {result.seconds:>8.1f} {r['accuracy']:>9.4f} "
                     f"{r['confidence']:>10.4f} {r['ece']:>7.4f} {r['nll']:>7.4f} {r['brier']:>7.4f}")
    return "\n".join(lines)


def plot_reliability(results: list[Result], labels: Tensor, path: str, n_bins: int = 15) -> None:
    """One reliability diagram per model, side by side, with per-bin counts, written to ``path`` (PNG)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = reliability_diagram({result.name: result.probs for result in results}, labels, n_bins)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[Result]:
    """Pre-train, fine-tune the three models, print the table, write the diagram; returns the results.
    Runs on ``args.threads`` CPU threads (the table depends on it) and restores torch's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[Result]:
    torch.manual_seed(args.seed)
    splits = load_digits_splits(args.seed)
    print(f"digits: pre-train {len(splits.pretrain[0])} images (0-4); fine-tune on 5-9: "
          f"train {len(splits.train[0])}, val {len(splits.val[0])}, test {len(splits.test[0])}")

    backbone = TinyViT(num_classes=5)
    train(backbone, splits.pretrain, args.pretrain_epochs, 1e-3, args.batch_size, F.cross_entropy,
          "pre-train (digits 0-4)", args.seed)
    pretrain_acc = metrics.accuracy(member_logits(backbone, splits.pretrain[0])[0].softmax(-1), splits.pretrain[1])
    print(f"pre-trained backbone: training accuracy {pretrain_acc.item():.4f} on digits 0-4")

    results = []
    torch.manual_seed(args.seed + 1)
    single = copy.deepcopy(backbone)
    single.head = nn.Linear(single.head.in_features, 5)
    seconds = train(single, splits.train, args.finetune_epochs, args.lr_full, args.batch_size, F.cross_entropy,
                    "single model (full fine-tune)", args.seed)
    results.append(Result("Single model", trainable(single), seconds,
                          member_logits(single, splits.test[0])[0].softmax(-1)))
    temperature = metrics.fit_temperature(member_logits(single, splits.val[0])[0], splits.val[1])
    results.append(Result(f"Single model + temp. scaling (T={temperature:.2f})", trainable(single), seconds,
                          metrics.apply_temperature(member_logits(single, splits.test[0])[0], temperature)))

    for name, members in (("Single LoRA", 1), (f"LoRA-Ensemble ({args.members} members)", args.members)):
        torch.manual_seed(args.seed + 2)
        ensemble = LoRAEnsemble(copy.deepcopy(backbone), num_members=members, rank=args.rank,
                                target_modules=["qkv", "proj"], num_classes=5, backend=args.backend,
                                replicate_at="blocks")
        seconds = train(ensemble, splits.train, args.finetune_epochs, args.lr_lora, args.batch_size, ensemble_loss,
                        name, args.seed)
        probs = member_logits(ensemble, splits.test[0]).softmax(-1)
        results.append(Result(name, trainable(ensemble), seconds, probs.mean(0)))
        if members > 1:
            mi = metrics.mutual_information(probs)
            wrong = probs.mean(0).argmax(-1) != splits.test[1]
            print(f"{name}: mean mutual information {mi[~wrong].mean().item():.4f} on correct test predictions, "
                  f"{mi[wrong].mean().item() if wrong.any() else float('nan'):.4f} on wrong ones")

    print(f"\nTest split: {len(splits.test[0])} images of the digits 5-9 (ECE with 15 bins)")
    print(format_table(results, splits.test[1]))
    plot_reliability([r for r in results if "temp." not in r.name], splits.test[1], args.out)
    print(f"reliability diagram written to {args.out}")
    return results


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help of the demos: the description as written (line breaks kept), every option with its default."""


def plain_text(docstring: str) -> str:
    """``docstring`` without its reST inline markup (double backquotes, ``:mod:`...``` roles), for --help."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring).replace("``", "").strip()


def build_parser() -> argparse.ArgumentParser:
    """The options of ``--task digits``."""
    parser = argparse.ArgumentParser(prog="python -m lora_ensemble.demo --task digits", description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--members", type=int, default=8, help="LoRA-Ensemble members")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="epochs of pre-training on the digits 0-4")
    parser.add_argument("--finetune-epochs", type=int, default=30, help="epochs of each fine-tune on the digits 5-9")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every training")
    parser.add_argument("--lr-full", type=float, default=5e-4, help="learning rate of the full fine-tune")
    parser.add_argument("--lr-lora", type=float, default=3e-3, help="learning rate of the LoRA fine-tunes")
    parser.add_argument("--backend", default="auto", help="backend of the fused LoRA-Ensemble op")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, the initialisations and the batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch (the LoRA rows of the table change with the thread count)")
    parser.add_argument("--out", default="reliability.png", help="where to write the reliability diagram (PNG)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of ``--task digits`` from ``argv`` (default: the command line)."""
    return build_parser().parse_args(argv)


def full_help() -> str:
    """What ``python -m lora_ensemble.demo --help`` prints: every task, then each task's options."""
    from .demo_mcqa import build_parser as mcqa_parser

    tasks = "\n".join(f"  --task {name:<8} {what}" for name, what in TASKS.items())
    parts = [f"usage: python -m lora_ensemble.demo [--task {{{','.join(TASKS)}}}] [options of the task]\n\n"
             f"Two demos of LoRA-Ensembles, on the CPU with nothing downloaded:\n\n{tasks}\n\n"
             f"The options of each task follow; python -m lora_ensemble.demo --task TASK --help shows one task."]
    for name, parser in (("digits", build_parser()), ("mcqa", mcqa_parser())):
        parts.append(f"{'=' * 20} --task {name} {'=' * 20}\n\n{parser.format_help().strip()}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``--task digits`` (default): this demo; ``--task mcqa``: :mod:`lora_ensemble.demo_mcqa`; ``--help``
    without ``--task``: :func:`full_help`."""
    chooser = argparse.ArgumentParser(prog="python -m lora_ensemble.demo", add_help=False)
    chooser.add_argument("--task", choices=tuple(TASKS))
    chooser.add_argument("-h", "--help", action="store_true")
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.help and chosen.task is None:
        print(full_help(), end="")
        chooser.exit()
    if chosen.help:
        rest.append("--help")
    if chosen.task == "mcqa":
        from .demo_mcqa import main as mcqa_main

        mcqa_main(rest)
    else:
        run(parse_args(rest))


if __name__ == "__main__":
    main()
