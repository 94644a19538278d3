"""Decoding rules of :meth:`LoRAEnsemble.generate <lora_ensemble.LoRAEnsemble.generate>`: options, and
the choice of each next token from the members' logits.

Per-member decoding (``ensemble=False``) treats each of the ``N*B`` rows of the stacked batch as its
own sequence, exactly as HF ``generate`` treats a batch: scores are the logits (divided by
``temperature`` when sampling), filtered by ``top_k`` then ``top_p``, then ``argmax`` (greedy) or one
``torch.multinomial`` draw over all rows (sampling) — HF's order and HF's filters, so member ``n``
matches HF ``generate`` of member ``n`` token for token (greedy; sampling with the same seed at
``N=1``).

Ensemble decoding (``ensemble=True``) chooses one token per sequence from the mean of the member
probabilities, ``p = mean_n softmax(logits_n / temperature)`` (``temperature`` only when sampling);
the scores are ``log p``, filtered by ``top_k`` / ``top_p`` as above (so sampling draws from ``p``
renormalised over the kept tokens), greedy takes ``argmax p``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["GenerationOptions", "choose_next_tokens", "top_k_filter", "top_p_filter"]

# HF GenerationConfig fields that change what HF generate produces and that this decoder does not
# implement, with their neutral values: a model whose generation_config sets one gets a warning.
_UNSUPPORTED_CONFIG = {
    "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
    "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
}
# HF's defaults for what is unset in both the call and the model's generation_config.
_DEFAULTS = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass
class GenerationOptions:
    """Resolved decoding options (see :meth:`from_call`)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: list[int]
    pad_token_id: int | None
    generator: torch.Generator | None

    @classmethod
    def from_call(cls, generation_config: Any, generator: torch.Generator | None = None,
                  **given: Any) -> GenerationOptions:
        """Each option as given, else the model's ``generation_config`` value, else HF's default
        (``max_new_tokens=20``, greedy, ``temperature=1``, ``top_k=50``, ``top_p=1``); the pad token
        defaults to the first end-of-sequence token, as in HF.

        Raises:
            ValueError: an option out of range (named, with its value).
        """
        def pick(name: str) -> Any:
            if given.get(name) is not None:
                return given[name]
            value = getattr(generation_config, name, None)
            return value if value is not None else _DEFAULTS.get(name)

        if generation_config is not None:
            ignored = {name: getattr(generation_config, name, None) for name in _UNSUPPORTED_CONFIG}
            ignored = {k: v for k, v in ignored.items() if v is not None and v != _UNSUPPORTED_CONFIG[k]}
            if ignored:
                warnings.warn(f"LoRAEnsemble.generate ignores these generation_config settings, which HF generate "
                              f"would apply: {ignored}", stacklevel=3)
        eos = pick("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (Sequence, Tensor)) else [eos])]
        pad = pick("pad_token_id")
        options = cls(max_new_tokens=pick("max_new_tokens"), do_sample=bool(pick("do_sample")),
                      temperature=float(pick("temperature")), top_k=pick("top_k"), top_p=float(pick("top_p")),
                      eos_token_ids=eos_ids, pad_token_id=int(pad) if pad is not None else (eos_ids or [None])[0],
                      generator=generator)
        if not isinstance(options.max_new_tokens, int) or options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {options.max_new_tokens!r}")
        if not options.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {options.temperature}")
        if not isinstance(options.top_k, int) or options.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {options.top_k!r}")
        if not 0 < options.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {options.top_p}")
        return options


def top_k_filter(scores: Tensor, top_k: int) -> Tensor:
    """``scores [R, V]`` with all but each row's ``top_k`` largest set to ``-inf`` (HF's
    ``TopKLogitsWarper``; ties at the k-th value are kept; 0 keeps everything)."""
    if top_k == 0 or top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """``scores [R, V]`` keeping each row's smallest set of most likely tokens whose probability sums
    to at least ``top_p``, the rest ``-inf`` (HF's ``TopPLogitsWarper``; the top token always stays)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def choose_next_tokens(member_logits: Tensor, options: GenerationOptions, ensemble: bool) -> Tensor:
    """The next token of every sequence.

    Args:
        member_logits: ``[N, B, V]``, each member's next-token logits (float32, as HF decodes).
        options: the decoding options.
        ensemble: choose from the mean of the member probabilities (one token per ``B`` row) instead
            of per member.

    Returns:
        ``[B]`` (``ensemble``) or ``[N*B]`` (member-major), int64.
    """
    sampling = options.do_sample
    if ensemble:
        temperature = options.temperature if sampling else 1.0
        scores = (member_logits / temperature).softmax(dim=-1).mean(dim=0).log()
    else:
        scores = member_logits.flatten(0, 1)
        if sampling and options.temperature != 1.0:
            scores = scores / options.temperature
    if not sampling:
        return scores.argmax(dim=-1)
    scores = top_p_filter(top_k_filter(scores, options.top_k), options.top_p)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=options.generator).squeeze(1)
