"""Multiple-choice QA uncertainty with a LoRA-Ensemble of a tiny GPT: ``python -m lora_ensemble.demo --task mcqa``.

The recipe of Balabanov & Linander (2024), "Uncertainty quantification in fine-tuned LLMs using LoRA
ensembles", at toy scale, on the CPU, with nothing downloaded:

1. Pre-train a tiny GPT-2 (built from a config) as a language model on generated facts
   ``entity relation value ;`` about 60 entities and two relations, colour and size (four values
   each). Entities are mentioned with Zipf frequencies, so the model knows the frequent ones well
   and the rare ones poorly: its "general knowledge", with gaps.
2. Fine-tune, on generated multiple-choice questions about the colour of half of the entities
   (``Q e12 color ? A c0 B c1 C c2 D c3 Answer:`` -> ``C``), a single LoRA and a LoRA-Ensemble of
   ``--members`` members: LoRA on GPT-2's ``attn.c_attn`` / ``attn.c_proj`` (``Conv1D``), peft's
   init, ``lora_dropout=0.1``, the cross-entropy of the answer letter at the next token. Each member
   sees the questions in its own order, as independently trained members would: the member-stacked
   batch holds a different batch per member and goes straight into ``ensemble.model``.
3. Score colour questions about all entities (in distribution, ID: for the other half the answer
   rests on pre-training alone) and size questions (out of distribution, OOD: facts from
   pre-training, a question type never fine-tuned on) with
   ``predict(ids, answer_token_ids=[A, B, C, D])``: the distribution over the four letters, its
   entropy (total uncertainty) and, for the ensemble, the mutual information (epistemic).
4. Print accuracy and the AUROC (scikit-learn's) with which each score ranks wrong answers above
   right ones (ID) and OOD questions above ID ones, and plot the ROC curves to ``--out``.

The defaults take about 1.5 CPU-minutes (one thread; ``main`` sets ``torch.set_num_threads(1)``,
which is faster than two threads on a shared two-core machine). Everything is seeded (``--seed``).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics
from ._optional import optional_dependency
from .demo import HelpFormatter, plain_text, train
from .ensemble import EnsemblePrediction, LoRAEnsemble

__all__ = ["McqaScores", "World", "main", "make_facts", "make_questions", "parse_args", "run"]

# Token ids: entities 0..ENTITIES-1, then each relation's values, then the rest.
ENTITIES, VALUES = 60, 4
COLOR, SIZE = 0, 1  # the relations
_VALUE0 = (ENTITIES, ENTITIES + VALUES)  # first value token of each relation
REL = (ENTITIES + 2 * VALUES, ENTITIES + 2 * VALUES + 1)
Q, QMARK, ANSWER, SEP, BOS = range(ENTITIES + 2 * VALUES + 2, ENTITIES + 2 * VALUES + 7)
LETTERS = list(range(BOS + 1, BOS + 5))  # A B C D
VOCAB = LETTERS[-1] + 1


def render(ids: Tensor) -> str:
    """Token ids as text (``Q e12 color ? A c7 B c2 C c0 D c5 Answer:``)."""
    names = {REL[COLOR]: "color", REL[SIZE]: "size", Q: "Q", QMARK: "?", ANSWER: "Answer:", SEP: ";"}
    names.update({letter: "ABCD"[i] for i, letter in enumerate(LETTERS)})
    words = []
    for t in ids.tolist():
        if t in names:
            words.append(names[t])
        elif t < ENTITIES:
            words.append(f"e{t}")
        elif t < ENTITIES + 2 * VALUES:
            words.append(f"{'cs'[(t - ENTITIES) // VALUES]}{(t - ENTITIES) % VALUES}")
    return " ".join(words)


@dataclass
class World:
    """The facts: ``values[r][e]``, the value (0..VALUES-1) of relation ``r`` for entity ``e``, and how
    often each entity is mentioned in pre-training (Zipf: a long tail of rarely seen entities)."""

    values: Tensor      # [2, ENTITIES]
    frequency: Tensor   # [ENTITIES], sums to 1

    @classmethod
    def draw(cls, generator: torch.Generator) -> World:
        ranks = torch.randperm(ENTITIES, generator=generator).float() + 1
        return cls(torch.randint(0, VALUES, (2, ENTITIES), generator=generator), (1 / ranks) / (1 / ranks).sum())


def make_facts(world: World, count: int, facts_per_sequence: int, generator: torch.Generator) -> Tensor:
    """``[count, 1 + 4 * facts_per_sequence]`` pre-training sequences: ``BOS`` then facts
    ``entity relation value ;``, entities drawn by their frequency, relations uniformly."""
    shape = (count, facts_per_sequence)
    entity = torch.multinomial(world.frequency, count * facts_per_sequence, replacement=True,
                               generator=generator).view(shape)
    relation = torch.randint(0, 2, shape, generator=generator)
    value = world.values[relation, entity] + torch.tensor(_VALUE0)[relation]
    facts = torch.stack([entity, torch.tensor(REL)[relation], value, torch.full(shape, SEP)], dim=-1)
    return torch.cat([torch.full((count, 1), BOS), facts.flatten(1)], dim=1)


def make_questions(world: World, relation: int, count: int, generator: torch.Generator,
                   entities: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``count`` questions ``BOS Q entity relation ? A v0 B v1 C v2 D v3 Answer:`` (``[count, 14]``) about
    entities drawn uniformly from ``entities`` (default: all), the options being the relation's four
    values in a fixed order, and the index of the right option (``[count]``)."""
    entities = torch.arange(ENTITIES) if entities is None else entities
    entity = entities[torch.randint(0, len(entities), (count,), generator=generator)]
    options = [t for i, letter in enumerate(LETTERS) for t in (letter, _VALUE0[relation] + i)]
    prefix = torch.tensor([BOS, Q]).expand(count, -1)
    suffix = torch.tensor([REL[relation], QMARK, *options, ANSWER]).expand(count, -1)
    return torch.cat([prefix, entity[:, None], suffix], dim=1), world.values[relation, entity]


def tiny_gpt(seed: int) -> nn.Module:
    """A 3-layer GPT-2 (d=64, 4 heads, no dropout) over the demo's tokens."""
    with optional_dependency("python -m lora_ensemble.demo --task mcqa"):
        from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=3, n_head=4, bos_token_id=BOS,
                        eos_token_id=SEP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def lm_loss(output: Any, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of an HF causal-LM output on ``ids``."""
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class MemberBatches(nn.Module):
    """Each member on its own batch: ``ids [B, N, T]`` (``ids[b, n]`` is member ``n``'s question ``b``)
    -> the answer letters' logits ``[N, B, 4]`` at the last position. The member-stacked batch
    ``[N*B, T]`` (member-major) goes straight into the wrapped model."""

    def __init__(self, ensemble: LoRAEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, ids: Tensor) -> Tensor:
        stacked = ids.transpose(0, 1).flatten(0, 1)
        logits = self.ensemble.model(stacked, logits_to_keep=1).logits[:, -1, LETTERS]
        return logits.view(ids.shape[1], ids.shape[0], len(LETTERS))


def member_loss(logits: Tensor, answers: Tensor) -> Tensor:
    """Mean cross-entropy of the members, ``logits [N, B, 4]`` against their own ``answers [B, N]``."""
    return F.cross_entropy(logits.flatten(0, 1), answers.t().flatten())


@dataclass
class McqaScores:
    """A model's predictions on the in-distribution (``id``) and out-of-distribution (``ood``) questions."""

    name: str
    id: EnsemblePrediction
    ood: EnsemblePrediction
    id_answers: Tensor

    def measures(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Uncertainty score -> (its values on the ID questions, on the OOD questions)."""
        measures = {"entropy": (self.id.predictive_entropy, self.ood.predictive_entropy)}
        if self.id.member_probs.shape[0] > 1:
            measures["mutual information"] = (self.id.mutual_information, self.ood.mutual_information)
        return measures

    def wrong(self) -> Tensor:
        """``[B]`` whether the mean prediction is wrong on each ID question."""
        return self.id.mean_probs.argmax(-1) != self.id_answers


def score_rows(scores: list[McqaScores]) -> list[dict[str, Any]]:
    """One row per (model, uncertainty score): ID accuracy, the AUROC of wrong vs right (ID) and of
    OOD vs ID (:func:`lora_ensemble.metrics.error_auroc`, :func:`~lora_ensemble.metrics.ood_auroc`),
    and the score's mean on each side."""
    rows = []
    for s in scores:
        wrong = s.wrong()
        both_kinds = bool(wrong.any()) and bool((~wrong).any())  # an AUROC needs both sides (else nan)
        for measure, (in_dist, out_dist) in s.measures().items():
            rows.append({"model": s.name, "score": measure, "accuracy": 1 - wrong.float().mean().item(),
                         "wrong_vs_right": float(metrics.error_auroc(in_dist, ~wrong)) if both_kinds else math.nan,
                         "ood_vs_id": float(metrics.ood_auroc(in_dist, out_dist)) if len(out_dist) else math.nan,
                         "mean_id": in_dist.mean().item(), "mean_ood": out_dist.mean().item()})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table."""
    header = (f"{'model':<22} {'score':<19} {'ID accuracy':>11} {'AUROC wrong/right':>18} {'AUROC OOD/ID':>13} "
              f"{'mean ID':>8} {'mean OOD':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<22} {r['score']:<19} {r['accuracy']:>11.4f} {r['wrong_vs_right']:>18.4f} "
                     f"{r['ood_vs_id']:>13.4f} {r['mean_id']:>8.4f} {r['mean_ood']:>9.4f}")
    return "\n".join(lines)


def plot_roc(scores: list[McqaScores], path: str) -> None:
    """ROC curves of every score: wrong vs right answers (left), OOD vs ID questions (right)."""
    with optional_dependency("python -m lora_ensemble.demo --task mcqa"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for s in scores:
        wrong = s.wrong()
        for measure, (in_dist, out_dist) in s.measures().items():
            label = f"{s.name}: {measure}"
            if 0 < wrong.sum() < len(wrong):
                fpr, tpr, _ = roc_curve(wrong.numpy(), in_dist.double().numpy())
                axes[0].plot(fpr, tpr, label=label)
            is_ood = torch.cat([torch.zeros(len(in_dist)), torch.ones(len(out_dist))])
            fpr, tpr, _ = roc_curve(is_ood.numpy(), torch.cat([in_dist, out_dist]).double().numpy())
            axes[1].plot(fpr, tpr, label=label)
    titles = ("wrong vs right answers (colour questions)", "OOD (size) vs ID (colour) questions")
    for ax, title in zip(axes, titles, strict=True):
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("false positive rate")
    axes[0].set_ylabel("true positive rate")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[McqaScores]:
    """Pre-train, fine-tune the single LoRA and the ensemble, print the table, write the plot."""
    generator = torch.Generator().manual_seed(args.seed)
    world = World.draw(generator)
    corpus = make_facts(world, args.pretrain_sequences, 8, generator)
    asked = torch.randperm(ENTITIES, generator=generator)[:ENTITIES // 2]
    questions, answers = make_questions(world, COLOR, args.train_questions, generator, asked)
    id_q = make_questions(world, COLOR, args.test_questions, generator)
    ood_q = make_questions(world, SIZE, args.test_questions, generator)
    print(f"pre-train on {len(corpus)} sequences of 8 facts about {ENTITIES} entities (colour and size), "
          f"e.g. {render(corpus[0, :13])} ...")
    print(f"fine-tune on {len(questions)} colour questions about {len(asked)} of the entities, e.g. "
          f"{render(questions[0])} -> {'ABCD'[answers[0]]}")
    print(f"test: {len(id_q[0])} colour questions (ID) and {len(ood_q[0])} size questions (OOD) about all entities")

    backbone = tiny_gpt(args.seed)
    train(backbone, (corpus, corpus), args.pretrain_epochs, 3e-3, args.batch_size, lm_loss, "pre-train (facts)",
          args.seed)

    scores = []
    for name, members in (("single LoRA", 1), (f"LoRA-Ensemble ({args.members})", args.members)):
        torch.manual_seed(args.seed + 1)
        ensemble = LoRAEnsemble(copy.deepcopy(backbone), num_members=members, rank=args.rank, alpha=2.0 * args.rank,
                                lora_dropout=0.1)
        order = torch.stack([torch.randperm(len(questions), generator=generator) for _ in range(members)], dim=1)
        train(MemberBatches(ensemble), (questions[order], answers[order]), args.finetune_epochs, args.lr,
              args.batch_size, member_loss, f"fine-tune {name}", args.seed + 2)
        scores.append(McqaScores(name, ensemble.predict(id_q[0], answer_token_ids=LETTERS),
                                 ensemble.predict(ood_q[0], answer_token_ids=LETTERS), id_q[1]))

    print("\nAUROC: how well each score ranks wrong answers above right ones (colour questions) and size questions "
          "above colour ones (0.5 = chance)")
    print(format_rows(score_rows(scores)))
    plot_roc(scores, args.out)
    print(f"ROC curves written to {args.out}")
    return scores


def build_parser() -> argparse.ArgumentParser:
    """The options of ``--task mcqa``."""
    parser = argparse.ArgumentParser(prog="python -m lora_ensemble.demo --task mcqa", description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--members", type=int, default=5, help="LoRA-Ensemble members")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--pretrain-sequences", type=int, default=2000, help="pre-training sequences of 8 facts")
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="epochs of pre-training on the facts")
    parser.add_argument("--train-questions", type=int, default=400, help="fine-tuning questions (colour)")
    parser.add_argument("--test-questions", type=int, default=1000, help="test questions of each kind (ID, OOD)")
    parser.add_argument("--finetune-epochs", type=int, default=80, help="epochs of each LoRA fine-tune")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every training (per member)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the LoRA fine-tunes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisations and the batches")
    parser.add_argument("--out", default="mcqa_uncertainty.png", help="where to write the ROC curves (PNG)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
