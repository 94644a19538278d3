"""Decoding with a :class:`~lora_ensemble.LoRAEnsemble` of a causal LM (``N`` members, ``B`` prompts):
HF ``generate`` over the member-stacked batch, the ensemble's decoding rules, prefill and decode
step, multiple-choice answer scoring and the uncertainty of generated text. ``LoRAEnsemble.generate``,
``predict`` and ``sequence_uncertainty`` are entry points into this module.

**Per-member generation** (``ensemble=False``) is HF's own ``GenerationMixin.generate`` of the wrapped
model on the member-stacked prompts ``[N*B, T]``; the stacked LoRA layers give row block ``n`` member
``n``'s factors (a layer splits its rows into ``N`` equal blocks; no row carries a member id). HF keeps
every member's rows in that member's block:

* for beams and ``num_return_sequences`` HF expands the batch with ``repeat_interleave(k, dim=0)``:
  row ``n*B + b`` becomes rows ``(n*B + b)*k .. (n*B + b)*k + k-1``, so member ``n`` owns rows
  ``n*B*k : (n+1)*B*k``, member-major again, as the layers need;
* beam search reorders the KV cache with ``index_select(0, beam_idx)``, where ``beam_idx`` picks each
  prompt's next beams among that prompt's own ``k`` rows: a row never moves to another prompt, so never
  into another member's block (the tests check beams against each member decoded alone);
* everything else HF does is per row: logits processors, stopping criteria, eos handling, sampling.

So member ``n``'s rows are HF ``generate`` of member ``n`` alone, with every HF option and return type
(tested token for token against peft adapters for greedy, beam search and ``num_return_sequences``,
with left padding and eos lists). The result is reshaped member-first: ``sequences [N, B*k, T+new]``,
every per-row output field ``[N, rows per member, ...]`` (``beam_indices`` counted within the member,
as member ``n`` alone would give them); the cache stays stacked. Sampling draws every row from the
global generator (HF's), so a seed (``torch.manual_seed``) reproduces it; with one member it equals HF.

**Ensemble decoding** (``ensemble="mean_probs"`` or ``"mean_logprobs"``; ``True`` is the default
``"mean_probs"``) is HF ``generate`` of *one* model whose batch is the ``B`` prompts and whose next-token
logits are the ensemble's log-probabilities: while it runs, a pre-hook on the wrapped model replicates
each call's ``R`` rows member-major and a forward hook replaces the ``N*R`` member logits by the
combined ``[R, ...]`` log-probabilities; the KV cache (a :class:`~transformers.DynamicCache` of ``N*R``
rows) maps beam search's ``R``-row reorder onto each member's block. HF's logits processors, warpers
(temperature, top-k, top-p, repetition penalty, ...), sampling (one draw per sequence, shared by the
members), beam search, stopping criteria and ``output_scores`` / ``output_logits`` then act on the
ensemble exactly as on a single model. The rules, for member logits ``l_n`` at one position:

* ``"mean_probs"`` (default): ``log mean_n softmax(l_n)``, the mixture of the members. It is the
  ensemble's predictive distribution of Bayesian model averaging, the one whose entropy is the total
  uncertainty that splits into expected entropy + mutual information (:func:`token_uncertainty`), what
  :meth:`~lora_ensemble.LoRAEnsemble.predict`, :mod:`lora_ensemble.metrics` and torch-uncertainty use,
  and LM-Polygraph's token-level ``pe`` ensembling. Sampling from it is sampling a member uniformly,
  then a token from that member.
* ``"mean_logprobs"``: ``log_softmax(mean_n log_softmax(l_n))``, the normalised product of the members
  (a geometric mean: sharper, a token any member finds unlikely stays unlikely). OpenNMT-py's default
  ensemble rule averages the log-probabilities without renormalising: the same greedy tokens, beam
  scores that differ by the log-normaliser.

**Prefill / decode step** (:func:`prefill`, :func:`decode_one_token`, :func:`decode_n_tokens`; the shape of
gpt-fast's functions) run any HF causal LM one call at a time with its KV cache: ``ens.model`` on the
stacked rows, a peft model with one adapter set, the base model. The benchmarks and the MCQA demo time
a question (prefill) and a decoded token (one step) with them, and a compiled or CUDA-graphed step can
replace :func:`decode_one_token` later. :func:`answer_logits` scores multiple-choice answers at each
prompt's last token (:meth:`~lora_ensemble.LoRAEnsemble.predict`).

**Uncertainty of generated text** (:func:`sequence_uncertainty`): every member scores the generated
sequences in one teacher-forced pass; per generated token LM-Polygraph's measures
(:func:`lora_ensemble.metrics.token_uncertainty`), per sequence their mean over its generated tokens
(LM-Polygraph's length-normalised sum), and each member's sequence log-probability.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import metrics
from .layout import replicate_members

if TYPE_CHECKING:
    from .ensemble import LoRAEnsemble

__all__ = [
    "RULES",
    "DecodeState",
    "SequenceUncertainty",
    "answer_logits",
    "cache_of",
    "check_tokens",
    "decode_n_tokens",
    "decode_one_token",
    "ensemble_log_probs",
    "generate",
    "positions",
    "prefill",
    "sequence_uncertainty",
]

RULES: tuple[str, ...] = ("mean_probs", "mean_logprobs")
# Names HF has given the KV cache argument and output field: ``cache`` from transformers 5.2x on
# (``past_key_values`` still accepted there with a FutureWarning), ``past_key_values`` before.
_CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values")
# generate() options that ensemble decoding cannot honour, with the reason.
_NOT_WITH_ENSEMBLE = {
    "assistant_model": "assisted decoding verifies an assistant's tokens against one model's cache",
    "prompt_lookup_num_tokens": "assisted decoding verifies candidate tokens against one model's cache",
    "cache_implementation": "ensemble decoding keeps the members' KV cache in its own DynamicCache of N*R rows",
    "cache": "ensemble decoding brings its own KV cache (N*R rows, member-aware beam reordering)",
    "past_key_values": "ensemble decoding brings its own KV cache (N*R rows, member-aware beam reordering)",
}


# --- inputs ------------------------------------------------------------------------------------------


def positions(mask: Tensor) -> Tensor:
    """HF's position ids of a padded batch: ``cumsum(mask) - 1``, 0 on padding (``[B, T]``)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def check_tokens(input_ids: Any, attention_mask: Any) -> Tensor:
    """Validate ``input_ids [B, T]`` and ``attention_mask``; returns the mask (ones when None).

    Raises:
        ValueError: ``input_ids`` not an integer ``[B, T]`` tensor with ``B, T >= 1``, a mask of another
            shape, or one that is not 0/1 or has a row without a 1.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [B, T] with B, T >= 1, got {shape}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all() or not attention_mask.bool().any(-1).all():
        raise ValueError("attention_mask must hold 0/1 with at least one 1 (attended token) per row")
    return attention_mask


def _check_left_padded(mask: Tensor) -> None:
    if not mask[:, -1].all():
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"generate needs left padding; rows {rows} end in padding (attention_mask[:, -1] == 0)")


def _forward_parameters(model: Any) -> frozenset[str]:
    """The keyword arguments of an HF model's forward (a peft model: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return frozenset(inspect.signature(base.forward).parameters)


def _cache_name(parameters: frozenset[str]) -> str:
    return next((name for name in _CACHE_NAMES if name in parameters), "past_key_values")


def cache_of(output: Any) -> Any:
    """The KV cache an HF output carries (under the name this transformers version uses)."""
    keys = output.keys()
    return next((output[name] for name in _CACHE_NAMES if name in keys), None)


# --- decoding rules ------------------------------------------------------------------------------------


def _check_rule(rule: Any) -> None:
    if rule not in RULES:
        raise ValueError(f"ensemble decoding rule must be one of {RULES} (or True for {RULES[0]!r}), got {rule!r}")


def ensemble_log_probs(member_logits: Tensor, rule: str = "mean_probs") -> Tensor:
    """The ensemble's next-token log-probabilities from member logits ``[N, ..., V] -> [..., V]``, in
    float32 or wider (float64 logits stay float64).

    ``"mean_probs"``: ``log mean_n softmax(l_n)`` (``logsumexp_n log_softmax(l_n) - log N``).
    ``"mean_logprobs"``: ``log_softmax(mean_n log_softmax(l_n))``. See the module docstring.
    """
    _check_rule(rule)
    log_probs = member_logits.to(torch.promote_types(member_logits.dtype, torch.float32)).log_softmax(dim=-1)
    if rule == "mean_probs":
        return log_probs.logsumexp(dim=0) - math.log(member_logits.shape[0])
    return log_probs.mean(dim=0).log_softmax(dim=-1)


@functools.cache
def _member_stacked_cache_class() -> type:
    from transformers import DynamicCache

    class MemberStackedCache(DynamicCache):
        """HF's dynamic KV cache of the member-stacked rows ``[N*R, ...]`` of a model that HF ``generate``
        sees with ``R`` rows: beam search's reorder ``beam_idx [R]`` is applied to every member's block."""

        def __init__(self, num_members: int, config: Any) -> None:
            super().__init__(config=config)
            self.num_members = num_members

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            rows = beam_idx.numel()
            blocks = torch.arange(self.num_members, device=beam_idx.device)[:, None] * rows
            super().reorder_cache((blocks + beam_idx.view(1, -1)).flatten())

    return MemberStackedCache


# --- generate ------------------------------------------------------------------------------------------


def generate(ensemble: LoRAEnsemble, input_ids: Tensor, attention_mask: Tensor | None = None,
             rule: str | None = None, **hf_options: Any) -> Any:
    """HF ``generate`` of every member (``rule=None``) or of the ensemble under ``rule``; see the
    module docstring and :meth:`LoRAEnsemble.generate <lora_ensemble.LoRAEnsemble.generate>`."""
    model = ensemble.model
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise TypeError(f"generate needs a causal language model (HF can_generate()), got {type(model).__name__}")
    if "generator" in hf_options:
        raise TypeError("generate takes no generator: HF generate samples from the global generator; seed it with "
                        "torch.manual_seed(...) for reproducible sampling")
    members = ensemble.num_members
    if ensemble.member_chunk_size is not None and ensemble.member_chunk_size < members:
        raise ValueError(f"generate decodes all num_members={members} members in one stacked batch (one KV cache "
                         f"of N*B rows); member_chunk_size={ensemble.member_chunk_size} applies to forward and predict "
                         "only: set ens.member_chunk_size = None to generate")
    mask = check_tokens(input_ids, attention_mask)
    _check_left_padded(mask)
    if rule is None:
        return _generate_members(ensemble, input_ids, mask, hf_options)
    _check_rule(rule)
    refused = sorted(set(hf_options) & set(_NOT_WITH_ENSEMBLE))
    if refused:
        raise TypeError(f"generate(ensemble=...) does not take {refused}: {_NOT_WITH_ENSEMBLE[refused[0]]}")
    if hf_options.get("use_cache", getattr(model.generation_config, "use_cache", True)) is not False:
        cache_class = _member_stacked_cache_class()
        hf_options[_cache_name(_forward_parameters(model))] = cache_class(
            members, model.config.get_text_config(decoder=True))

    def combine(output: Any) -> Any:
        logits = output["logits"]
        output["logits"] = ensemble_log_probs(logits.view(members, -1, *logits.shape[1:]), rule)
        return output

    with ensemble.external_calls(replicate=True, transform_output=combine):
        return model.generate(input_ids, attention_mask=mask, **hf_options)


def _generate_members(ensemble: LoRAEnsemble, input_ids: Tensor, mask: Tensor, hf_options: dict[str, Any]) -> Any:
    """Per-member generation: HF ``generate`` on the stacked prompts, output reshaped member-first."""
    model, members, batch = ensemble.model, ensemble.num_members, input_ids.shape[0]
    config = hf_options.get("generation_config") or model.generation_config
    options = {}
    for name, value in hf_options.items():  # model inputs with the batch on dim 0 are stacked like the prompts
        batched = isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch
        options[name] = replicate_members(value, members) if batched and not hasattr(config, name) else value
    prefix_fn: Callable[[int, Tensor], list[int]] | None = options.get("prefix_allowed_tokens_fn")
    if prefix_fn is not None:  # HF numbers the stacked prompts 0..N*B-1; the caller's function knows B
        options["prefix_allowed_tokens_fn"] = lambda batch_id, ids: prefix_fn(batch_id % batch, ids)
    with ensemble.external_calls(replicate=False):
        output = model.generate(replicate_members(input_ids, members), attention_mask=replicate_members(mask, members),
                                **options)
    if isinstance(output, Tensor):
        return output.view(members, -1, output.shape[-1])
    num_beams = options.get("num_beams") or getattr(config, "num_beams", None) or 1
    fields = {}
    for name, value in output.items():
        if name in _CACHE_NAMES:
            fields[name] = value
        elif name == "beam_indices":  # rows of the whole stacked beam batch -> rows of the member's own
            rows = value.view(members, -1, value.shape[-1])
            offsets = (torch.arange(members, device=rows.device) * (batch * num_beams)).view(-1, 1, 1)
            fields[name] = torch.where(rows >= 0, rows - offsets, rows)
        else:
            fields[name] = _members_first(value, members)
    return type(output)(**fields)


def _members_first(value: Any, members: int) -> Any:
    """Every tensor in ``value`` (nested tuples of per-row tensors) from ``[N*R, ...]`` to ``[N, R, ...]``."""
    if isinstance(value, Tensor):
        return value.view(members, -1, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_members_first(v, members) for v in value)
    return value


# --- prefill and decode steps --------------------------------------------------------------------------


@dataclass
class DecodeState:
    """What one decoding step hands the next, for ``R`` rows (any HF causal LM; the ensemble's model on
    its ``N*B`` stacked rows).

    Attributes:
        logits: ``[R, V]`` next-token logits of every row (the model's dtype).
        attention_mask: ``[R, T]`` the mask of everything in the cache (1 = token).
        cache: the model's KV cache after the last call.
        parameters: the model forward's keyword arguments (what the steps may pass).
    """

    logits: Tensor
    attention_mask: Tensor
    cache: Any
    parameters: frozenset[str]


def _step(model: Any, input_ids: Tensor, mask: Tensor, cache: Any, parameters: frozenset[str]) -> DecodeState:
    """One call of ``model`` on the new tokens ``input_ids [R, t]`` after ``cache`` (``mask`` covers both)."""
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True,
                              _cache_name(parameters): cache}
    if "position_ids" in parameters:
        inputs["position_ids"] = positions(mask)[:, -input_ids.shape[1]:]
    if "logits_to_keep" in parameters:
        inputs["logits_to_keep"] = 1
    output = model(**inputs)
    new_cache = cache_of(output)
    if new_cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache with use_cache=True")
    return DecodeState(output.logits[:, -1], mask, new_cache, parameters)


def prefill(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None) -> DecodeState:
    """Run the (left-padded) prompts ``input_ids [R, T]`` through ``model`` with an empty KV cache.

    Positions follow the mask (as HF ``generate`` computes them); only the last position reaches the LM
    head when the model takes ``logits_to_keep``. Returns the state after the prompts, whose
    ``logits [R, V]`` predict each row's first new token.

    Raises:
        ValueError: malformed or right-padded ``input_ids`` / ``attention_mask``.
    """
    mask = check_tokens(input_ids, attention_mask)
    _check_left_padded(mask)
    return _step(model, input_ids, mask, None, _forward_parameters(model))


def decode_one_token(model: Any, state: DecodeState, tokens: Tensor) -> DecodeState:
    """Feed one new token per row, ``tokens [R]``, after ``state``; returns the next state."""
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(state.attention_mask.shape[0], 1)], dim=1)
    return _step(model, tokens.view(-1, 1), mask, state.cache, state.parameters)


def decode_n_tokens(model: Any, state: DecodeState, count: int) -> tuple[Tensor, DecodeState]:
    """Greedy decoding of ``count`` tokens per row from ``state`` (no end-of-sequence stop): the tokens
    ``[R, count]`` and the state after the last one was fed (HF ``generate``'s greedy tokens, tested)."""
    tokens = []
    for _ in range(count):
        tokens.append(state.logits.argmax(dim=-1))
        state = decode_one_token(model, state, tokens[-1])
    return torch.stack(tokens, dim=1), state


# --- multiple-choice answers ---------------------------------------------------------------------------


def answer_logits(ensemble: LoRAEnsemble, input_ids: Any, answer_token_ids: Sequence[int] | Tensor,
                  kwargs: dict[str, Any]) -> Tensor:
    """Every member's logits of the answer tokens ``[N, B, A]`` at each prompt's last attended position
    (left or right padding); ``kwargs`` are the other model inputs (position ids from the mask unless
    given; ``logits_to_keep`` keeps only the needed positions when the model takes it).

    Raises:
        ValueError: malformed ``input_ids`` / ``attention_mask``, an empty ``answer_token_ids``, one
            outside the vocabulary, or ``logits_to_keep`` in ``kwargs``.
    """
    mask = check_tokens(input_ids, kwargs.get("attention_mask"))
    answers = torch.as_tensor(answer_token_ids, device=input_ids.device).long().reshape(-1)
    if answers.numel() == 0:
        raise ValueError("answer_token_ids must name at least one token")
    parameters = _forward_parameters(ensemble.model)
    last = input_ids.shape[1] - 1 - mask.flip(-1).argmax(-1)  # each row's last attended position
    if "position_ids" in parameters and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = positions(mask)
    if "logits_to_keep" in parameters:
        if "logits_to_keep" in kwargs:
            raise ValueError("predict with answer_token_ids chooses logits_to_keep itself; do not pass it")
        kept = torch.unique(last)
        kwargs["logits_to_keep"] = kept
        last = torch.searchsorted(kept, last)
    logits = ensemble(input_ids, **kwargs)  # [N, B, T or kept, V]
    vocab = logits.shape[-1]
    if answers.min() < 0 or answers.max() >= vocab:
        raise ValueError(f"answer_token_ids must be in [0, {vocab}) (the vocabulary), got {answers.tolist()}")
    index = last.view(1, -1, 1, 1).expand(logits.shape[0], -1, 1, vocab)
    return logits.gather(2, index).squeeze(2)[..., answers]


# --- uncertainty of generated text ---------------------------------------------------------------------


@dataclass
class SequenceUncertainty:
    """The members' view of generated sequences (``N`` members; ``S`` the leading dims of the
    sequences scored, e.g. ``[B*k]`` from ensemble decoding or ``[N, B*k]`` from per-member generation;
    ``L`` generated positions).

    Attributes:
        tokens: measure -> ``[*S, L]`` per generated token (0 where ``token_mask`` is False); the measures
            of :func:`lora_ensemble.metrics.token_uncertainty` (``entropy_of_mean``, ``expected_entropy``,
            ``mutual_information``, ``reverse_mutual_information``, ``expected_pairwise_kl``), in nats.
        sequences: measure -> ``[*S]``, the mean over each sequence's generated tokens (LM-Polygraph's
            sequence-level aggregation of one hypothesis: the length-normalised sum).
        token_mask: ``[*S, L]`` bool, the generated tokens: up to and including the first end-of-sequence
            token, not the padding after it.
        member_token_log_probs: ``[N, *S, L]`` each member's log-probability of each generated token (0
            outside ``token_mask``).
        member_sequence_log_probs: ``[N, *S]`` each member's log-probability of each generated sequence
            given its prompt (the sum over ``token_mask``).
    """

    tokens: dict[str, Tensor]
    sequences: dict[str, Tensor]
    token_mask: Tensor
    member_token_log_probs: Tensor
    member_sequence_log_probs: Tensor


def sequence_uncertainty(ensemble: LoRAEnsemble, sequences: Tensor, attention_mask: Tensor | None = None, *,
                         prompt_length: int, eos_token_id: int | Sequence[int] | None = None) -> SequenceUncertainty:
    """Score generated ``sequences`` with every member (see :class:`SequenceUncertainty`).

    Args:
        sequences: ``[*S, T + L]``: prompts of ``T = prompt_length`` tokens (left-padded) followed by ``L``
            generated positions, as ``generate`` returns them (``[B*k, T+L]`` or ``[N, B*k, T+L]``).
        attention_mask: the prompts' mask ``[B, T]`` given to ``generate`` (None: no padding); row ``b``
            belongs to sequence rows ``b*k .. b*k + k-1`` of every leading block, as HF orders them.
        prompt_length: ``T``.
        eos_token_id: end-of-sequence token(s) that close a sequence (None: the model's
            ``generation_config``; ``[]``: none, every generated position counts).

    Raises:
        ValueError: ``sequences`` not an integer tensor with more than ``prompt_length`` positions, or a
            mask whose rows do not divide the sequences' rows.
    """
    if not isinstance(sequences, Tensor) or sequences.dim() < 2 or sequences.is_floating_point():
        shape = tuple(sequences.shape) if isinstance(sequences, Tensor) else type(sequences).__name__
        raise ValueError(f"sequences must be an integer tensor [..., T + L], got {shape}")
    if not isinstance(prompt_length, int) or not 0 < prompt_length < sequences.shape[-1]:
        raise ValueError(f"prompt_length must be an int in [1, {sequences.shape[-1]}) for sequences of shape "
                         f"{tuple(sequences.shape)}, got {prompt_length!r}")
    leading, total = sequences.shape[:-1], sequences.shape[-1]
    rows = sequences.reshape(-1, total)
    prompts = rows[:, :prompt_length]
    per_block = leading[-1]
    if attention_mask is None:
        prompt_mask = torch.ones_like(prompts)
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 \
                or attention_mask.shape[1] != prompt_length or per_block % attention_mask.shape[0]:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be the prompts' mask [B, {prompt_length}] with B dividing the "
                             f"{per_block} sequence rows per block of sequences {tuple(sequences.shape)}, got {shape}")
        check_tokens(attention_mask.long(), attention_mask)  # 0/1, a token in every row
        prompt_mask = attention_mask.repeat_interleave(per_block // attention_mask.shape[0], dim=0)
        prompt_mask = prompt_mask.repeat(rows.shape[0] // per_block, 1)
    generated = rows[:, prompt_length:]
    new = generated.shape[1]
    if eos_token_id is None:
        eos_token_id = getattr(ensemble.model.generation_config, "eos_token_id", None)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=rows.device).long().reshape(-1)
    ended_before = torch.isin(generated, eos).long().cumsum(dim=1) - torch.isin(generated, eos).long()
    token_mask = ended_before == 0
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows.shape[0], new)], dim=1)
    kwargs: dict[str, Any] = {"attention_mask": full_mask}
    parameters = _forward_parameters(ensemble.model)
    if "position_ids" in parameters:
        kwargs["position_ids"] = positions(full_mask)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = new + 1
    logits = ensemble(rows, **kwargs)[:, :, -(new + 1):-1]  # [N, R, L, V]: position t predicts token t+1
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
    member_tokens = log_probs.gather(-1, generated.expand(log_probs.shape[0], -1, -1)[..., None]).squeeze(-1)
    member_tokens = member_tokens.masked_fill(~token_mask, 0)
    counts = token_mask.sum(dim=1)
    tokens = {name: value.masked_fill(~token_mask, 0) for name, value in metrics.token_uncertainty(log_probs).items()}
    members = log_probs.shape[0]
    return SequenceUncertainty(
        tokens={name: value.view(*leading, new) for name, value in tokens.items()},
        sequences={name: (value.sum(dim=1) / counts).view(leading) for name, value in tokens.items()},
        token_mask=token_mask.view(*leading, new),
        member_token_log_probs=member_tokens.view(members, *leading, new),
        member_sequence_log_probs=member_tokens.sum(dim=-1).view(members, *leading))
