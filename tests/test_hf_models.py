"""``LoRAEnsemble(model, N, r)`` with no other argument on HF causal LMs (Llama, Mistral, Qwen2, Gemma,
Phi-3, GPT-2) and classifiers (ViT, DeiT with teacher, AST, RoBERTa): the attention projections are
wrapped, ``lm_head`` stays one shared frozen layer, classifier heads become per-member as a whole,
and member ``n`` equals peft adapter ``n`` holding the same LoRA factors and heads (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_ensemble import EnsembleHead, LoRAEnsemble, PerMemberModule

from .hf_tiny import NUM_LABELS, VOCAB, causal_lm, classifier, classifier_inputs, peft_copy, peft_member, randomise

pytest.importorskip("peft")

LM_TARGETS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "mistral": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gemma": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
CLASSIFIER_HEADS = {  # head name -> per-member type
    "vit": {"classifier": EnsembleHead},
    "deit": {"cls_classifier": EnsembleHead, "distillation_classifier": EnsembleHead},
    "ast": {"classifier": PerMemberModule},
    "roberta": {"classifier": PerMemberModule},
}


@pytest.mark.parametrize("family", LM_TARGETS)
def test_causal_lm_zero_argument_wrap_equals_peft_adapters(family: str) -> None:
    torch.manual_seed(0)
    original = causal_lm(family)
    lm_head = original.lm_head
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=3, rank=2, backend="torch")
    prefix = "h" if family == "gpt2" else "layers"
    expected = [f"{prefix}.{layer}.{tail}" for layer in range(2) for tail in LM_TARGETS[family]]
    assert sorted(name.split(".", 1)[1] for name in ensemble.target_names) == sorted(expected)
    assert ensemble.head_names == [] and ensemble.init == "peft"
    shared_head = ensemble.model.lm_head
    assert type(shared_head) is type(lm_head) and not shared_head.weight.requires_grad
    trainable = {name for name, p in ensemble.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{name}.lora_{ab}" for name in ensemble.target_names for ab in "AB"}
    if family == "gpt2":
        assert all(layer.fan_in_fan_out for layer in ensemble.lora_layers().values())
    randomise(ensemble)
    reference = peft_copy(original, ensemble)
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        logits = ensemble(ids)
        assert logits.shape == (3, 2, 5, VOCAB)
        for n in range(3):
            expected = peft_member(reference, n)(input_ids=ids).logits
            torch.testing.assert_close(logits[n], expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("family", CLASSIFIER_HEADS)
def test_classifier_zero_argument_wrap_equals_peft_modules_to_save(family: str) -> None:
    torch.manual_seed(0)
    original = classifier(family)
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=2, rank=2, backend="torch")
    assert {name: type(head) for name, head in ensemble.heads.items()} == CLASSIFIER_HEADS[family]
    assert ensemble.init == "paper"
    assert len(ensemble.target_names) == 8  # q, k, v, out of two layers
    randomise(ensemble)
    trainable = {name for name, p in ensemble.named_parameters() if p.requires_grad}
    head_params = {f"model.{name}" for name in ensemble.member_parameters()}
    assert trainable == head_params
    reference = peft_copy(original, ensemble)
    inputs = classifier_inputs(family, 3)
    with torch.no_grad():
        logits = ensemble(**inputs)
        assert logits.shape == (2, 3, NUM_LABELS)
        for n in range(2):
            expected = peft_member(reference, n)(**inputs).logits
            torch.testing.assert_close(logits[n], expected, rtol=1e-10, atol=1e-10)


def test_fresh_module_heads_are_drawn_per_member() -> None:
    torch.manual_seed(0)
    ensemble = LoRAEnsemble(classifier("roberta"), num_members=3, rank=2, num_classes=5, backend="torch")
    head = ensemble.head
    assert isinstance(head, PerMemberModule)
    out_proj = head.module.out_proj
    assert out_proj.weight.shape == (3, 5, 32) and out_proj.bias.shape == (3, 5)
    assert not torch.equal(out_proj.weight[0], out_proj.weight[1])  # independent draws
    assert torch.equal(head.module.dense.weight[0], head.module.dense.weight[2])  # copies of the model's
    assert ensemble(**classifier_inputs("roberta", 2)).shape == (3, 2, 5)
