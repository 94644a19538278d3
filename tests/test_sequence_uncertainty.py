"""``LoRAEnsemble.sequence_uncertainty`` of generated text against a hand computation from N peft
models (one adapter per member, float64): per token the entropy of the mean, expected entropy, mutual
information, reverse MI and expected pairwise KL written out as sums of entropies and KL divergences,
per sequence their mean over the generated tokens, and each member's sequence log-probability."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_ensemble import LoRAEnsemble, metrics
from lora_ensemble.generation import positions

from .hf_tiny import causal_lm, left_padded, peft_copy, peft_member, randomise

pytest.importorskip("peft")


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum()


def by_hand(member_log_probs: torch.Tensor) -> dict[str, float]:
    """The five measures of one position from the members' log-probabilities ``[N, V]``."""
    probs = member_log_probs.exp()
    members = len(probs)
    mean = probs.mean(0)
    expected = sum(entropy(p) for p in probs) / members
    return {
        "entropy_of_mean": entropy(mean),
        "expected_entropy": expected,
        "mutual_information": entropy(mean) - expected,
        "reverse_mutual_information": sum(kl(mean, p) for p in probs) / members,
        "expected_pairwise_kl": sum(kl(p, q) for p in probs for q in probs) / members ** 2,
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("decoding", ["ensemble", "members"])
def test_sequence_uncertainty_equals_a_hand_computation_from_peft_models(family: str, decoding: str) -> None:
    torch.manual_seed(0)
    original = causal_lm(family)
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=3, rank=2, backend="torch")
    randomise(ensemble, 1.0)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(2, 4, [2, 0])
    options = {"max_new_tokens": 5, "num_beams": 2, "num_return_sequences": 2}
    mode = {"ensemble": True} if decoding == "ensemble" else {}
    ensemble.model.generation_config.eos_token_id = None
    free = ensemble.generate(ids, mask, **mode, **options)
    eos = int(free.reshape(-1, free.shape[-1])[0, 6])  # ends the first sequence at its third new token
    sequences = ensemble.generate(ids, mask, eos_token_id=eos, **mode, **options)  # [B*k, T+L] or [N, B*k, T+L]
    result = ensemble.sequence_uncertainty(sequences, mask, prompt_length=4, eos_token_id=eos)
    rows = sequences.reshape(-1, sequences.shape[-1])
    new = rows.shape[1] - 4
    full_mask = torch.cat([mask.repeat_interleave(2, 0).repeat(len(rows) // 4, 1),
                           torch.ones(len(rows), new, dtype=torch.long)], 1)
    with torch.no_grad():
        member_log_probs = torch.stack([
            peft_member(reference, n)(input_ids=rows, attention_mask=full_mask,
                                      position_ids=positions(full_mask)).logits[:, 3:-1].log_softmax(-1)
            for n in range(3)])  # [N, R, L, V]: the distributions of the generated tokens
    token_mask = result.token_mask.reshape(len(rows), new)
    tokens = {name: value.reshape(len(rows), new) for name, value in result.tokens.items()}
    member_tokens = result.member_token_log_probs.reshape(3, len(rows), new)
    ended = 0
    for r, row in enumerate(rows):
        generated = row[4:].tolist()
        length = generated.index(eos) + 1 if eos in generated else new
        ended += length < new
        assert token_mask[r].tolist() == [t < length for t in range(new)], f"row {r}"
        for t in range(length):
            for name, value in by_hand(member_log_probs[:, r, t]).items():
                torch.testing.assert_close(tokens[name][r, t], value, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(member_tokens[:, r, t], member_log_probs[:, r, t, generated[t]])
        for name in tokens:
            assert (tokens[name][r, length:] == 0).all()
            mean = tokens[name][r, :length].mean()
            torch.testing.assert_close(result.sequences[name].reshape(-1)[r], mean, msg=name)
        sequence_log_probs = member_log_probs[:, r, torch.arange(length), torch.tensor(generated[:length])].sum(-1)
        torch.testing.assert_close(result.member_sequence_log_probs.reshape(3, -1)[:, r], sequence_log_probs)
    assert ended >= 1, "the eos should end at least one sequence early"
    leading = sequences.shape[:-1]
    assert result.token_mask.shape == (*leading, new) and result.sequences["mutual_information"].shape == leading
    assert result.member_sequence_log_probs.shape == (3, *leading)
    assert (result.sequences["mutual_information"] > 0).all()


def test_token_uncertainty_identities_and_errors() -> None:
    torch.manual_seed(0)
    log_probs = torch.randn(4, 3, 7, dtype=torch.float64).log_softmax(-1)
    measures = metrics.token_uncertainty(log_probs)
    torch.testing.assert_close(measures["expected_pairwise_kl"],
                               measures["mutual_information"] + measures["reverse_mutual_information"])
    same = metrics.token_uncertainty(log_probs[:1].expand(4, -1, -1))  # equal members: no disagreement
    for name in ("mutual_information", "reverse_mutual_information", "expected_pairwise_kl"):
        torch.testing.assert_close(same[name], torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    masked = log_probs.clone()
    masked[0, :, 0] = float("-inf")  # a token member 0 rules out: finite entropies, infinite divergences
    measures = metrics.token_uncertainty(masked)
    assert measures["entropy_of_mean"].isfinite().all() and measures["expected_entropy"].isfinite().all()
    assert (measures["expected_pairwise_kl"] == float("inf")).all()
    with pytest.raises(ValueError, match=r"member_log_probs must be \[N, \.\.\., V\]"):
        metrics.token_uncertainty(log_probs[0, 0])
    with pytest.raises(TypeError, match="floating-point"):
        metrics.token_uncertainty(torch.ones(2, 3, dtype=torch.long))


def test_sequence_uncertainty_errors_name_the_argument() -> None:
    torch.manual_seed(0)
    ensemble = LoRAEnsemble(causal_lm("llama"), num_members=2, rank=2, backend="torch")
    ids, mask = left_padded(2, 4, [1, 0])
    sequences = ensemble.generate(ids, mask, max_new_tokens=2, ensemble=True)
    with pytest.raises(ValueError, match=r"prompt_length must be an int in \[1, 6\)"):
        ensemble.sequence_uncertainty(sequences, mask, prompt_length=6)
    with pytest.raises(ValueError, match=r"attention_mask must be the prompts' mask \[B, 4\]"):
        ensemble.sequence_uncertainty(sequences, mask[:, :3], prompt_length=4)
    with pytest.raises(ValueError, match="sequences must be an integer tensor"):
        ensemble.sequence_uncertainty(sequences.float(), mask, prompt_length=4)
