"""``LoRAEnsemble.generate``: every member decoded in one stacked batch with one KV cache equals peft
adapter ``n`` and HF ``generate`` of the exported member ``n`` token for token (greedy, left padding,
end-of-sequence); ensemble decoding follows the mean of the member probabilities; sampling matches
HF's sampler and a cache-free reference drawing from the same generator; member chunks change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lora_ensemble import LoRAEnsemble, replicate_members
from lora_ensemble.io import export_member

from .hf_tiny import VOCAB, causal_lm, left_padded, peft_copy, peft_member, randomise

pytest.importorskip("peft")

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]


def lm_ensemble(family: str, num_members: int, std: float = 0.3, **options) -> tuple[torch.nn.Module, LoRAEnsemble]:
    torch.manual_seed(0)
    original = causal_lm(family)
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=num_members, rank=2, backend="torch", **options)
    randomise(ensemble, std)
    return original, ensemble


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_members_equal_peft_adapters(family: str) -> None:
    original, ensemble = lm_ensemble(family, num_members=3, std=1.0)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(3, 5, [0, 2, 4])
    out = ensemble.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert out.shape == (3, 3, 11)
    assert torch.equal(out[:, :, :5], ids.expand(3, -1, -1))
    for n in range(3):
        expected = peft_member(reference, n).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                       do_sample=False, eos_token_id=None)
        assert torch.equal(out[n], expected), f"member {n}"
    assert not torch.equal(out[0], out[1]), "members should decode differently"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_members_equal_hf_generate_of_exported_members_with_eos(family: str) -> None:
    _, ensemble = lm_ensemble(family, num_members=2)
    ids, mask = left_padded(2, 4, [1, 0])
    free = ensemble.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    eos = int(free[0, 0, 6])  # member 0, row 0 ends at the first new token that is this one
    end = 4 + free[0, 0, 4:].tolist().index(eos)
    out = ensemble.generate(ids, mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert out[0, 0, end] == eos and (out[0, 0, end + 1:] == 0).all()
    for n in range(2):
        member = export_member(ensemble, n).eval()
        expected = member.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=eos,
                                   pad_token_id=0)
        length = expected.shape[1]
        assert torch.equal(out[n, :, :length], expected), f"member {n}"
        assert (out[n, :, length:] == 0).all()  # others ran on: padding after this member's end


def test_ensemble_greedy_follows_the_mean_probabilities() -> None:
    _, ensemble = lm_ensemble("gpt2", num_members=3, std=1.0)
    ids, mask = left_padded(2, 4, [2, 0])
    out = ensemble.generate(ids, mask, max_new_tokens=5, ensemble=True, eos_token_id=[])
    assert out.shape == (2, 9)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(5):  # cache-free reference: the whole sequence every step
            logits = ensemble(seq, attention_mask=m, position_ids=positions(m))[:, :, -1]
            token = logits.softmax(-1).mean(0).argmax(-1)
            seq, m = torch.cat([seq, token[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out, seq)
    members = ensemble.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    assert not all(torch.equal(out, members[n]) for n in range(3))  # the mean is not one member


@pytest.mark.parametrize("ensemble_mode", [False, True])
def test_sampling_equals_a_cache_free_reference_with_hf_warpers(ensemble_mode: bool) -> None:
    _, ensemble = lm_ensemble("llama", num_members=3, std=1.0)
    ids, mask = left_padded(2, 4, [0, 3])
    options = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "max_new_tokens": 6,
               "eos_token_id": []}
    out = ensemble.generate(ids, mask, generator=torch.Generator().manual_seed(7), ensemble=ensemble_mode, **options)
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)]
    generator = torch.Generator().manual_seed(7)
    seq, m = (ids, mask) if ensemble_mode else (replicate_members(ids, 3), mask)
    with torch.no_grad():
        for _ in range(6):
            if ensemble_mode:
                logits = ensemble(seq, attention_mask=m, position_ids=positions(m))[:, :, -1].float()
                scores = (logits / 0.7).softmax(-1).mean(0).log()
                for warper in warpers[1:]:
                    scores = warper(seq, scores)
            else:  # the stacked batch straight into the wrapped model: each row its own sequence
                stacked_mask = replicate_members(m, 3)
                scores = ensemble.model(seq, attention_mask=stacked_mask,
                                        position_ids=positions(stacked_mask)).logits[:, -1].float()
                for warper in warpers:
                    scores = warper(seq, scores)
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            seq, m = torch.cat([seq, token[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out, seq if ensemble_mode else seq.view(3, 2, -1))
    if not ensemble_mode:  # equal members, independent draws: their continuations differ
        with torch.no_grad():
            for layer in ensemble.lora_layers().values():
                layer.lora_B.zero_()
        same = ensemble.generate(ids[:1], max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=[])
        assert len({tuple(row.tolist()) for row in same[:, 0]}) > 1


def test_single_member_sampling_equals_hf_generate_with_the_same_seed() -> None:
    _, ensemble = lm_ensemble("qwen2", num_members=1, std=1.0)
    ids, mask = left_padded(3, 4, [0, 1, 2])
    torch.manual_seed(11)
    out = ensemble.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=1.3, top_k=10, top_p=0.8,
                            eos_token_id=[])
    member = export_member(ensemble, 0).eval()
    torch.manual_seed(11)
    expected = member.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.3,
                               top_k=10, top_p=0.8, eos_token_id=None)
    assert torch.equal(out[0], expected)


def test_ensemble_sampling_draws_from_the_mean_distribution() -> None:
    _, ensemble = lm_ensemble("llama", num_members=3, std=1.0)
    prompt = torch.randint(3, VOCAB, (1, 3))
    with torch.no_grad():
        ensemble.model.lm_head.weight.mul_(20)  # peaked member distributions that differ (untied lm_head)
        member_probs = ensemble(prompt)[:, 0, -1].float().softmax(-1)  # [N, V]
    mean = member_probs.mean(0)
    draws = 6000
    out = ensemble.generate(prompt.expand(draws, -1), max_new_tokens=1, do_sample=True, top_k=0, ensemble=True,
                            eos_token_id=[], generator=torch.Generator().manual_seed(0))
    empirical = torch.bincount(out[:, -1], minlength=VOCAB).float() / draws
    distance = 0.5 * (empirical - mean).abs().sum()
    member_distances = 0.5 * (member_probs - mean).abs().sum(-1)
    assert distance < 0.05 and member_distances.min() > 0.15, (distance, member_distances)


def test_member_chunks_decode_the_same_tokens() -> None:
    _, ensemble = lm_ensemble("mistral", num_members=5)
    ids, mask = left_padded(2, 3, [1, 0])
    results = {}
    for chunk in (None, 2):
        ensemble.member_chunk_size = chunk
        results[chunk] = [ensemble.generate(ids, mask, max_new_tokens=4, eos_token_id=[], ensemble=mode,
                                            do_sample=sample, generator=torch.Generator().manual_seed(3))
                          for mode in (False, True) for sample in (False, True)]
    for got, want in zip(results[2], results[None], strict=True):
        assert torch.equal(got, want)


def test_small_shapes_mode_restored_and_errors() -> None:
    _, ensemble = lm_ensemble("llama", num_members=1, lora_dropout=0.5)
    ids = torch.randint(3, VOCAB, (1, 1))
    ensemble.train()
    first = ensemble.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert first.shape == (1, 1, 4) and ensemble.training  # eval inside (no dropout), mode restored
    assert torch.equal(ensemble.generate(ids, max_new_tokens=3, eos_token_id=[]), first)
    assert ensemble.generate(ids, max_new_tokens=3, ensemble=True, eos_token_id=[]).shape == (1, 4)
    with pytest.raises(TypeError, match=r"does not support \['num_beams'\]"):
        ensemble.generate(ids, num_beams=2)
    ids2, mask = left_padded(2, 4, [0, 1])
    with pytest.raises(ValueError, match=r"left padding; rows \[1\]"):
        ensemble.generate(ids2, mask.flip(1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ensemble.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        ensemble.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ensemble.generate(ids, do_sample=True, top_p=1.5)
    ensemble.model.generation_config.repetition_penalty = 1.3
    with pytest.warns(UserWarning, match="repetition_penalty"):
        ensemble.generate(ids, max_new_tokens=1)
    classifier = LoRAEnsemble(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2, 1, target_modules="0", head=None)
    with pytest.raises(TypeError, match="causal language model"):
        classifier.generate(ids)
