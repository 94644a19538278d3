"""``LoRAEnsemble.generate`` is HF ``generate``: per member, member ``n``'s rows equal peft adapter ``n``
decoded alone (greedy, beam search, ``num_return_sequences``, HF processors, left padding, eos lists, the
dict outputs); ensemble decoding under both rules equals a cache-free reference loop over the members
(greedy with its scores, sampling with one shared draw per sequence, beam search); the prefill / decode
steps equal HF greedy decoding; no FutureWarning on the way; options that cannot apply are errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from lora_ensemble import LoRAEnsemble, replicate_members
from lora_ensemble.generation import decode_n_tokens, ensemble_log_probs, positions, prefill
from lora_ensemble.io import export_member

from .hf_tiny import VOCAB, causal_lm, left_padded, peft_copy, peft_member, randomise

pytest.importorskip("peft")

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]
RULES = ["mean_probs", "mean_logprobs"]


def lm_ensemble(family: str, num_members: int, std: float = 1.0, eos: bool = True,
                **options) -> tuple[torch.nn.Module, LoRAEnsemble]:
    """A tiny LM and its ensemble; ``eos=False``: no end-of-sequence token (fixed-length decoding)."""
    torch.manual_seed(0)
    original = causal_lm(family)
    if not eos:
        original.generation_config.eos_token_id = None
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=num_members, rank=2, backend="torch", **options)
    randomise(ensemble, std)
    return original, ensemble


def members_alone(reference: torch.nn.Module, count: int, ids: torch.Tensor, mask: torch.Tensor, **options) -> list:
    return [peft_member(reference, n).generate(input_ids=ids, attention_mask=mask, **options) for n in range(count)]


def assert_member_sequences(out: torch.Tensor, alone: list[torch.Tensor], fill: int = 0) -> None:
    """Member ``n``'s rows equal ``alone[n]``; where the stacked batch ran on (another member had not
    ended), member ``n``'s rows hold HF's fill value (the pad token; beam search: ``pad or eos[0]``)."""
    for n, expected in enumerate(alone):
        length = expected.shape[1]
        assert torch.equal(out[n, :, :length], expected), f"member {n}"
        assert (out[n, :, length:] == fill).all(), f"member {n} after its end"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_members_equal_peft_adapters(family: str) -> None:
    original, ensemble = lm_ensemble(family, num_members=3)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(3, 5, [0, 2, 4])
    out = ensemble.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (3, 3, 11) and torch.equal(out[:, :, :5], ids.expand(3, -1, -1))
    assert_member_sequences(out, members_alone(reference, 3, ids, mask, max_new_tokens=6, do_sample=False))
    assert not torch.equal(out[0], out[1]), "members should decode differently"


def eos_that_ends_early(ensemble: LoRAEnsemble, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """A token member 0 emits for prompt 0 at its third new token: an eos that ends that row early."""
    config = ensemble.model.generation_config
    config.eos_token_id = None
    free = ensemble.generate(ids, mask, max_new_tokens=6)
    config.eos_token_id = 1
    return int(free[0, 0, ids.shape[1] + 2])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [{"num_beams": 4}, {"num_beams": 4, "num_return_sequences": 2},
                                     {"repetition_penalty": 1.5, "min_new_tokens": 2, "no_repeat_ngram_size": 2}],
                         ids=["beams", "beams+return_sequences", "processors"])
def test_members_equal_peft_adapters_with_beams_return_sequences_and_eos_lists(family: str, options: dict) -> None:
    original, ensemble = lm_ensemble(family, num_members=3)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(2, 5, [2, 0])
    eos = [eos_that_ends_early(ensemble, ids, mask), 1]
    hf = {"max_new_tokens": 6, "eos_token_id": eos, "pad_token_id": 0, "do_sample": False, **options}
    out = ensemble.generate(ids, mask, **hf)
    rows = 2 * options.get("num_return_sequences", 1)
    assert out.shape[:2] == (3, rows)
    fill = eos[0] if "num_beams" in options else 0  # HF's beam search fills with `pad_token_id or eos[0]`
    assert_member_sequences(out, members_alone(reference, 3, ids, mask, **hf), fill)
    if "num_beams" not in options:
        return
    # the dict output: member-first, beam indices and scores as each member alone gives them
    full = ensemble.generate(ids, mask, return_dict_in_generate=True, output_scores=True, **hf)
    assert type(full).__name__ == "GenerateBeamDecoderOnlyOutput"
    for n in range(3):
        alone = peft_member(reference, n).generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                                                   output_scores=True, **hf)
        length = alone.sequences.shape[1]
        assert torch.equal(full.sequences[n, :, :length], alone.sequences)
        torch.testing.assert_close(full.sequences_scores[n], alone.sequences_scores)
        indices = full.beam_indices[n, :, :alone.beam_indices.shape[1]]
        assert torch.equal(indices, alone.beam_indices), f"member {n}"
        for step, scores in enumerate(alone.scores):
            torch.testing.assert_close(full.scores[step][n], scores)


def test_members_hf_options_logits_processor_stopping_criteria_streamer() -> None:
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    original, ensemble = lm_ensemble("qwen2", num_members=2, eos=False)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(2, 4, [1, 0])

    class Collect:
        def __init__(self) -> None:
            self.puts: list[torch.Tensor] = []

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value)

        def end(self) -> None:
            self.puts.append(torch.tensor([-1]))

    prompts_seen = set()

    def allowed(prompt: int, sequence: torch.Tensor) -> list[int]:  # prompt 1 may not use tokens below 32
        prompts_seen.add(prompt)
        return list(range(32, VOCAB)) if prompt == 1 else list(range(VOCAB))

    def hf(**extra) -> dict:
        return {"max_new_tokens": 8, "do_sample": False, "prefix_allowed_tokens_fn": allowed,
                "logits_processor": LogitsProcessorList([NoBadWordsLogitsProcessor([[5], [6, 7]], eos_token_id=1)]),
                "stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(4 + 5)]), **extra}

    streamer = Collect()
    out = ensemble.generate(ids, mask, **hf(streamer=streamer))
    assert out.shape == (2, 2, 9) and not (out[:, :, 4:] == 5).any() and (out[:, 1, 4:] >= 32).all()
    assert prompts_seen == {0, 1}  # the prompt's index in B, not the stacked row's
    assert_member_sequences(out, members_alone(reference, 2, ids, mask, **hf()))
    assert torch.equal(streamer.puts[0], replicate_members(ids, 2))  # the stacked prompts, then each step's tokens
    assert len(streamer.puts) == 1 + 5 + 1 and streamer.puts[1].shape == (4,)


def test_member_sampling_is_reproducible_and_one_member_equals_hf() -> None:
    _, ensemble = lm_ensemble("llama", num_members=3, eos=False)
    ids, mask = left_padded(2, 4, [0, 2])
    options = {"do_sample": True, "temperature": 1.3, "top_k": 10, "top_p": 0.8, "max_new_tokens": 6}
    torch.manual_seed(11)
    first = ensemble.generate(ids, mask, **options)
    torch.manual_seed(11)
    assert torch.equal(ensemble.generate(ids, mask, **options), first)
    with torch.no_grad():  # equal members, independent draws: their continuations differ
        for layer in ensemble.lora_layers().values():
            layer.lora_B.zero_()
    same = ensemble.generate(ids[:1], max_new_tokens=8, do_sample=True, top_k=0)
    assert len({tuple(row.tolist()) for row in same[:, 0]}) > 1
    _, single = lm_ensemble("qwen2", num_members=1, eos=False)
    member = export_member(single, 0).eval()  # before seeding: building it draws random initial weights
    torch.manual_seed(5)
    out = single.generate(ids, mask, **options)
    torch.manual_seed(5)
    expected = member.generate(ids, attention_mask=mask, **options)
    assert torch.equal(out[0], expected)


def reference_step(ensemble: LoRAEnsemble, seq: torch.Tensor, mask: torch.Tensor, rule: str) -> torch.Tensor:
    """Cache-free: the whole sequences through every member, the rule over their last logits -> [R, V]."""
    logits = ensemble(seq, attention_mask=mask, position_ids=positions(mask))[:, :, -1]
    return ensemble_log_probs(logits, rule)


def extend(seq: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([seq, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("rule", RULES)
def test_ensemble_greedy_and_its_scores_equal_a_cache_free_reference(rule: str) -> None:
    _, ensemble = lm_ensemble("gpt2", num_members=3, eos=False)
    ids, mask = left_padded(2, 4, [2, 0])
    out = ensemble.generate(ids, mask, max_new_tokens=5, ensemble=rule,
                            return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert out.sequences.shape == (2, 9) and len(out.scores) == 5
    seq, m = ids, mask
    with torch.no_grad():
        for step in range(5):
            log_probs = reference_step(ensemble, seq, m, rule)
            torch.testing.assert_close(out.scores[step], log_probs.float())  # float32, as HF keeps scores
            torch.testing.assert_close(out.logits[step], log_probs.float())
            seq, m = extend(seq, m, log_probs.argmax(-1))
    assert torch.equal(out.sequences, seq)
    members = ensemble.generate(ids, mask, max_new_tokens=5)
    assert not all(torch.equal(out.sequences, members[n]) for n in range(3))  # the ensemble is not one member
    other = ensemble.generate(ids, mask, max_new_tokens=1, ensemble=RULES[1 - RULES.index(rule)],
                              return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(other.scores[0], out.scores[0], atol=1e-3), "the rules give different distributions"


@pytest.mark.parametrize("rule", RULES)
def test_ensemble_sampling_shares_one_draw_per_sequence_as_a_cache_free_reference(rule: str) -> None:
    _, ensemble = lm_ensemble("llama", num_members=3, eos=False)
    ids, mask = left_padded(2, 4, [0, 3])
    options = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "max_new_tokens": 6}
    torch.manual_seed(7)
    out = ensemble.generate(ids, mask, ensemble=rule, **options)
    warpers = [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)]  # HF's order
    torch.manual_seed(7)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(6):
            scores = reference_step(ensemble, seq, m, rule).float()
            for warper in warpers:
                scores = warper(seq, scores)
            token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)  # one draw per sequence
            seq, m = extend(seq, m, token)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("rule", RULES)
def test_ensemble_beam_search_equals_a_cache_free_beam_search(rule: str) -> None:
    _, ensemble = lm_ensemble("mistral", num_members=3, eos=False)  # every beam runs to max_new_tokens
    ids, mask = left_padded(2, 4, [1, 0])
    beams, new = 4, 5
    out = ensemble.generate(ids, mask, ensemble=rule, num_beams=beams, num_return_sequences=beams,
                            max_new_tokens=new, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        for b in range(2):  # one prompt at a time, every beam's whole sequence through every member
            seq, m, total = ids[b:b + 1], mask[b:b + 1], torch.zeros(1, dtype=torch.float64)
            for _ in range(new):
                candidates = (total[:, None] + reference_step(ensemble, seq, m, rule)).flatten()
                best = candidates.topk(beams)
                beam, token = best.indices // VOCAB, best.indices % VOCAB
                seq, m = extend(seq[beam], m[beam], token)
                total = best.values
            rows = slice(b * beams, (b + 1) * beams)
            assert torch.equal(out.sequences[rows], seq), f"prompt {b}"
            torch.testing.assert_close(out.sequences_scores[rows], (total / new).float())


def test_ensemble_sampling_draws_from_the_mean_distribution() -> None:
    _, ensemble = lm_ensemble("llama", num_members=3, eos=False)
    prompt = torch.randint(3, VOCAB, (1, 3))
    with torch.no_grad():
        ensemble.model.lm_head.weight.mul_(20)  # peaked member distributions that differ (untied lm_head)
        member_probs = ensemble(prompt)[:, 0, -1].float().softmax(-1)  # [N, V]
    mean = member_probs.mean(0)
    draws = 6000
    torch.manual_seed(0)
    out = ensemble.generate(prompt.expand(draws, -1), max_new_tokens=1, do_sample=True, top_k=0, ensemble=True)
    empirical = torch.bincount(out[:, -1], minlength=VOCAB).float() / draws
    distance = 0.5 * (empirical - mean).abs().sum()
    member_distances = 0.5 * (member_probs - mean).abs().sum(-1)
    assert distance < 0.05 and member_distances.min() > 0.15, (distance, member_distances)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_generate_and_predict_raise_no_future_warning(family: str) -> None:
    """transformers 5.2x deprecates ``past_key_values`` with a FutureWarning (our old decoding loop
    passed it every step); HF generate and the decode steps pass the cache under the name the installed
    transformers uses."""
    _, ensemble = lm_ensemble(family, num_members=2)
    ids, mask = left_padded(2, 4, [1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        seqs = ensemble.generate(ids, mask, max_new_tokens=3)
        ensemble.generate(ids, mask, max_new_tokens=3, num_beams=2, ensemble=True)
        ensemble.predict(ids, attention_mask=mask, answer_token_ids=[3, 4])
        ensemble.sequence_uncertainty(seqs, mask, prompt_length=4)
        with ensemble.external_calls(replicate=False):
            decode_n_tokens(ensemble.model, prefill(ensemble.model, replicate_members(ids, 2),
                                                    replicate_members(mask, 2)), 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_and_decode_steps_equal_hf_greedy(family: str) -> None:
    original, ensemble = lm_ensemble(family, num_members=3, eos=False)
    ids, mask = left_padded(2, 5, [3, 0])
    with torch.no_grad():
        tokens, state = decode_n_tokens(original, prefill(original, ids, mask), 4)
    assert torch.equal(tokens, original.generate(ids, attention_mask=mask, max_new_tokens=4)[:, 5:])
    assert state.attention_mask.shape == (2, 9)
    with torch.no_grad(), ensemble.external_calls(replicate=False):  # the ensemble's model on the stacked rows
        stacked, _ = decode_n_tokens(ensemble.model, prefill(ensemble.model, replicate_members(ids, 3),
                                                             replicate_members(mask, 3)), 4)
    assert torch.equal(stacked.view(3, 2, 4), ensemble.generate(ids, mask, max_new_tokens=4)[:, :, 5:])


def test_mode_restored_and_errors_name_the_option() -> None:
    _, ensemble = lm_ensemble("llama", num_members=2, eos=False, lora_dropout=0.5)
    ids = torch.randint(3, VOCAB, (1, 1))
    ensemble.train()
    first = ensemble.generate(ids, max_new_tokens=3)
    assert first.shape == (2, 1, 4) and ensemble.training  # eval inside (no dropout), mode restored
    assert torch.equal(ensemble.generate(ids, max_new_tokens=3), first)
    ids2, mask = left_padded(2, 4, [0, 1])
    with pytest.raises(ValueError, match=r"left padding; rows \[1\]"):
        ensemble.generate(ids2, mask.flip(1))
    with pytest.raises(ValueError, match="rule must be one of"):
        ensemble.generate(ids, ensemble="mean_logits")
    with pytest.raises(TypeError, match="no generator.*torch.manual_seed"):
        ensemble.generate(ids, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"does not take \['assistant_model'\]"):
        ensemble.generate(ids, ensemble=True, assistant_model=ensemble.model)
    with pytest.raises(TypeError, match=r"does not take \['cache_implementation'\]"):
        ensemble.generate(ids, ensemble=True, cache_implementation="static")
    ensemble.member_chunk_size = 1
    with pytest.raises(ValueError, match="member_chunk_size=1 applies to forward and predict only"):
        ensemble.generate(ids)
    classifier = LoRAEnsemble(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2, 1, target_modules="0", head=None)
    with pytest.raises(TypeError, match="causal language model"):
        classifier.generate(ids)
