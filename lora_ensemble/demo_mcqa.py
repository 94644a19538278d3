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
4. The same ensemble members also run as peft adapters of one model, one after another with
   ``set_adapter`` (what BAG's ``DeepEnsembleLoraWrapper`` and peft users do; written with
   ``save_peft_adapters``): the same predictions, another cost.
5. Print the table the field publishes for the single LoRA, the fused ensemble and the adapters in
   turn: accuracy, ECE (15 bins), NLL, Brier and the AUROC with which entropy and mutual information
   rank wrong answers above right ones (ID) and OOD questions above ID ones; then the cost of a
   question (the answer letters' distribution) and of a decoded token (greedy steps of every member,
   :mod:`lora_ensemble.generation`'s prefill / decode step), one question at a time, the peak memory
   (:mod:`lora_ensemble.cost`: on the CPU the weights plus the peak of the tensors alive during a
   question), and their ratio to the single model. Plot the ROC curves to ``--out``.

The defaults take about 1.5 CPU-minutes (one thread; ``main`` sets ``torch.set_num_threads(1)``,
which is faster than two threads on a shared two-core machine). Everything is seeded (``--seed``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cost, metrics
from ._optional import import_failure, optional_dependency
from .demo import HelpFormatter, plain_text, train
from .ensemble import EnsemblePrediction, LoRAEnsemble
from .generation import decode_one_token, prefill
from .io import save_peft_adapters
from .layout import replicate_members

__all__ = ["McqaResult", "McqaScores", "Runner", "World", "main", "make_facts", "make_questions", "parse_args", "run"]

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


@dataclass
class Runner:
    """One way to run a fine-tuned model on questions ``ids [B, T]`` (the cost table's rows).

    Attributes:
        name: the row's name.
        answer_probs: ``ids -> [N, B, 4]`` every member's distribution over the answer letters.
        decode: ``(ids, count) -> seconds``: the prompts' prefill, then ``count`` greedy decoding steps of
            every member (:mod:`lora_ensemble.generation`'s steps); returns the seconds of the steps alone.
        modules: what the runner holds in memory (weights and adapters).
    """

    name: str
    answer_probs: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor, int], float]
    modules: list[nn.Module]


def fused_runner(name: str, ensemble: LoRAEnsemble) -> Runner:
    """The LoRA-Ensemble's members in one stacked batch (``predict``; the decode steps on ``ens.model``)."""
    @torch.no_grad()
    def decode(ids: Tensor, count: int) -> float:
        with ensemble.external_calls(replicate=False):
            state = prefill(ensemble.model, replicate_members(ids, ensemble.num_members))
            start = cost.clock(ids.device)
            for _ in range(count):
                state = decode_one_token(ensemble.model, state, state.logits.argmax(-1))
            return cost.clock(ids.device) - start

    return Runner(name, lambda ids: ensemble.predict(ids, answer_token_ids=LETTERS).member_probs, decode, [ensemble])


def sequential_runner(name: str, ensemble: LoRAEnsemble, backbone: nn.Module, directory: str) -> Runner:
    """The same members as peft adapters of one model, run one after another with ``set_adapter`` (what
    BAG's ``DeepEnsembleLoraWrapper`` and peft users do): written with ``save_peft_adapters``, loaded
    with ``PeftModel.from_pretrained`` / ``load_adapter``."""
    from peft import PeftModel

    folders = save_peft_adapters(ensemble, directory)
    model = PeftModel.from_pretrained(copy.deepcopy(backbone), folders[0], adapter_name="member_0")
    for member, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"member_{member}")
    model.eval()
    names = [f"member_{member}" for member in range(len(folders))]

    @torch.no_grad()
    def answer_probs(ids: Tensor) -> Tensor:
        probs = []
        for adapter in names:
            model.set_adapter(adapter)
            probs.append(model(input_ids=ids, logits_to_keep=1).logits[:, -1, LETTERS].float().softmax(-1))
        return torch.stack(probs)

    @torch.no_grad()
    def decode(ids: Tensor, count: int) -> float:
        seconds = 0.0
        for adapter in names:
            model.set_adapter(adapter)
            state = prefill(model, ids)
            start = cost.clock(ids.device)
            for _ in range(count):
                state = decode_one_token(model, state, state.logits.argmax(-1))
            seconds += cost.clock(ids.device) - start
        return seconds

    return Runner(name, answer_probs, decode, [model])


def scores_of(name: str, answer_probs: Callable[[Tensor], Tensor], id_q: tuple[Tensor, Tensor],
              ood_q: tuple[Tensor, Tensor], device: torch.device) -> McqaScores:
    """Run ``answer_probs`` on the ID and OOD questions on ``device``."""
    def prediction(ids: Tensor) -> EnsemblePrediction:
        with torch.no_grad():  # softmax(log p) = p; the scores on the CPU
            return EnsemblePrediction.from_logits(answer_probs(ids.to(device)).cpu().log())

    return McqaScores(name, prediction(id_q[0]), prediction(ood_q[0]), id_q[1])


def quality_rows(scores: list[McqaScores]) -> list[dict[str, Any]]:
    """One row per model on the ID questions: accuracy, ECE (15 bins), NLL, Brier of the mean prediction;
    the AUROC with which entropy and mutual information rank wrong answers above right ones
    (:func:`lora_ensemble.metrics.error_auroc`) and OOD questions above ID ones
    (:func:`~lora_ensemble.metrics.ood_auroc`); nan where a score does not exist (MI of one model)."""
    rows = []
    for s in scores:
        probs, answers, wrong = s.id.mean_probs, s.id_answers, s.wrong()
        both_kinds = bool(wrong.any()) and bool((~wrong).any())  # an AUROC needs both sides
        row = {"model": s.name, "accuracy": float(metrics.accuracy(probs, answers)),
               "ece": float(metrics.expected_calibration_error(probs, answers)),
               "nll": float(metrics.negative_log_likelihood(probs, answers)),
               "brier": float(metrics.brier_score(probs, answers))}
        for label, measure in (("entropy", "entropy"), ("mi", "mutual information")):
            in_dist, out_dist = s.measures().get(measure, (None, None))
            row[f"error_{label}"] = (float(metrics.error_auroc(in_dist, ~wrong))
                                     if in_dist is not None and both_kinds else math.nan)
            row[f"ood_{label}"] = float(metrics.ood_auroc(in_dist, out_dist)) if in_dist is not None else math.nan
        rows.append(row)
    return rows


def _number(value: float, digits: int = 4) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def format_quality(rows: list[dict[str, Any]]) -> str:
    """The quality rows as a Markdown table."""
    lines = ["| model | accuracy | ECE-15 | NLL | Brier | AUROC error (entropy) | AUROC error (MI) "
             "| AUROC OOD (entropy) | AUROC OOD (MI) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        values = [r[k] for k in ("accuracy", "ece", "nll", "brier", "error_entropy", "error_mi", "ood_entropy",
                                 "ood_mi")]
        lines.append(f"| {r['model']} | " + " | ".join(_number(v) for v in values) + " |")
    return "\n".join(lines)


def cost_rows(runners: list[Runner], questions: Tensor, new_tokens: int, device: torch.device,
              repeats: int = 5) -> list[dict[str, Any]]:
    """Per runner, one question at a time (batch 1) over ``questions [Q, T]``, the best of ``repeats`` runs
    (the runners interleaved):
    seconds per question (the answer letters' distribution of every member), seconds per decoded token of
    every member (``new_tokens`` greedy steps after each question's prefill, the steps alone), peak bytes
    while answering a question (:func:`lora_ensemble.cost.peak_memory`), and each as a ratio to the first
    runner (the single model)."""
    for runner in runners:  # warm-up
        runner.answer_probs(questions[:1])
        runner.decode(questions[:1], new_tokens)
    question_s = {runner.name: math.inf for runner in runners}
    token_s = dict(question_s)
    for _ in range(repeats):  # the runners interleaved, so that a busy spell of the machine hits them all
        for runner in runners:
            start = cost.clock(device)
            for question in questions:
                runner.answer_probs(question[None])
            question_s[runner.name] = min(question_s[runner.name], (cost.clock(device) - start) / len(questions))
            steps = sum(runner.decode(question[None], new_tokens) for question in questions)
            token_s[runner.name] = min(token_s[runner.name], steps / (len(questions) * new_tokens))
    rows = [{"model": runner.name, "seconds_per_question": question_s[runner.name],
             "seconds_per_token": token_s[runner.name],
             "peak_bytes": cost.peak_memory(functools.partial(runner.answer_probs, questions[:1]), runner.modules,
                                            device)}
            for runner in runners]
    for row in rows:
        row["question_ratio"] = row["seconds_per_question"] / rows[0]["seconds_per_question"]
        row["token_ratio"] = row["seconds_per_token"] / rows[0]["seconds_per_token"]
    return rows


def format_cost(rows: list[dict[str, Any]], device: torch.device) -> str:
    """The cost rows as a Markdown table, labelled with the device kind."""
    where = "CUDA" if device.type == "cuda" else "CPU"
    lines = [f"| model ({where}, batch 1) | ms / question | ms / decoded token | peak memory (MiB) "
             "| × single, question | × single, token |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {1e3 * r['seconds_per_question']:.2f} | {1e3 * r['seconds_per_token']:.2f} "
                     f"| {r['peak_bytes'] / 2**20:.2f} | {r['question_ratio']:.2f} | {r['token_ratio']:.2f} |")
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


@dataclass
class McqaResult:
    """What :func:`run` measured: every model's scores, the quality and cost rows, the printed tables."""

    scores: list[McqaScores]
    quality: list[dict[str, Any]]
    cost: list[dict[str, Any]]
    tables: str


def run(args: argparse.Namespace) -> McqaResult:
    """Pre-train, fine-tune the single LoRA and the ensemble, compare the ensemble fused and as peft
    adapters run in turn, print the quality and cost tables, write the plot."""
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

    ensembles = []
    for name, members in (("single LoRA", 1), (f"LoRA-Ensemble ({args.members})", args.members)):
        torch.manual_seed(args.seed + 1)
        ensemble = LoRAEnsemble(copy.deepcopy(backbone), num_members=members, rank=args.rank, alpha=2.0 * args.rank,
                                lora_dropout=0.1)
        order = torch.stack([torch.randperm(len(questions), generator=generator) for _ in range(members)], dim=1)
        train(MemberBatches(ensemble), (questions[order], answers[order]), args.finetune_epochs, args.lr,
              args.batch_size, member_loss, f"fine-tune {name}", args.seed + 2)
        ensembles.append(ensemble.eval())

    device = torch.device(args.device)  # trained on the CPU (seeded, reproducible), measured on `device`
    backbone.to(device)
    for ensemble in ensembles:
        ensemble.to(device)
    runners = [fused_runner("single LoRA", ensembles[0]),
               fused_runner(f"LoRA-Ensemble ({args.members}), fused", ensembles[1])]
    try:
        with tempfile.TemporaryDirectory() as directory:
            runners.append(sequential_runner(f"LoRA-Ensemble ({args.members}), peft adapters in turn", ensembles[1],
                                             backbone, directory))
    except ImportError as error:  # peft missing, or broken: say which
        print(f"no row for the adapters run one after another: {import_failure('peft') or error}")
    scores = [scores_of(r.name, r.answer_probs, id_q, ood_q, device) for r in runners]
    if len(scores) == 3:
        difference = (scores[2].id.member_probs - scores[1].id.member_probs).abs().max().item()
        print(f"peft adapters in turn vs the fused ensemble: max |difference| of member probabilities {difference:.1e}")

    quality = quality_rows(scores)
    timed = id_q[0][:args.timing_questions].to(device)
    cost_table = cost_rows(runners, timed, args.decode_tokens, device)
    tables = (f"Quality on the {len(id_q[0])} ID questions (ECE with 15 bins; AUROC: wrong answers above right "
              f"ones, and OOD questions above ID ones; 0.5 = chance):\n\n{format_quality(quality)}\n\n"
              f"Cost, {len(timed)} questions one at a time, {args.decode_tokens} decoded tokens each "
              f"({'CUDA' if device.type == 'cuda' else 'CPU'}, {torch.get_num_threads()} thread(s)):\n\n"
              f"{format_cost(cost_table, device)}")
    print("\n" + tables)
    plot_roc(scores[:2], args.out)
    print(f"ROC curves written to {args.out}")
    return McqaResult(scores, quality, cost_table, tables)


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
    parser.add_argument("--timing-questions", type=int, default=20, help="questions timed one at a time")
    parser.add_argument("--decode-tokens", type=int, default=8, help="greedy tokens decoded per timed question")
    parser.add_argument("--device", default="cpu", help="where the fine-tuned models are scored and timed "
                        "(training runs on the CPU)")
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
