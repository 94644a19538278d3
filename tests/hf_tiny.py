"""Tiny HF models built from configs (nothing is downloaded), and peft copies of a LoRAEnsemble:
one peft adapter per member holding that member's LoRA factors and heads (what each member is
tested against)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from lora_ensemble import LoRAEnsemble

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
NUM_LABELS = 3
_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def causal_lm(family: str) -> nn.Module:
    """A 2-layer causal LM of ``family`` in float64, eval mode (eos token 1, pad token 0)."""
    import transformers as t

    tokens = {"vocab_size": VOCAB, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    if family == "gpt2":
        config = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **tokens)
        return t.GPT2LMHeadModel(config).double().eval()
    configs = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, {"head_dim": 8}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
    }
    config_cls, model_cls, extra = configs[family]
    config = config_cls(**_SMALL, num_key_value_heads=2, max_position_embeddings=64, **tokens, **extra)
    return model_cls(config).double().eval()


def classifier(family: str) -> nn.Module:
    """A 2-layer HF classifier of ``family`` (``NUM_LABELS`` classes) in float64, eval mode."""
    import transformers as t

    if family == "vit":
        return t.ViTForImageClassification(t.ViTConfig(**_SMALL, image_size=8, patch_size=4,
                                                       num_labels=NUM_LABELS)).double().eval()
    if family == "deit":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**_SMALL, image_size=8, patch_size=4,
                                                                    num_labels=NUM_LABELS)).double().eval()
    if family == "ast":
        config = t.ASTConfig(**_SMALL, num_mel_bins=16, max_length=16, patch_size=8, frequency_stride=4,
                             time_stride=4, num_labels=NUM_LABELS)
        return t.ASTForAudioClassification(config).double().eval()
    if family == "roberta":
        config = t.RobertaConfig(**_SMALL, vocab_size=VOCAB, max_position_embeddings=20, num_labels=NUM_LABELS)
        return t.RobertaForSequenceClassification(config).double().eval()
    raise KeyError(family)


def classifier_inputs(family: str, batch: int) -> dict[str, torch.Tensor]:
    if family in ("vit", "deit"):
        return {"pixel_values": torch.randn(batch, 3, 8, 8, dtype=torch.float64)}
    if family == "ast":
        return {"input_values": torch.randn(batch, 16, 16, dtype=torch.float64)}
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, 4:] = 0
    return {"input_ids": torch.randint(3, VOCAB, (batch, 6)), "attention_mask": mask}


def randomise(ensemble: LoRAEnsemble, std: float = 0.3) -> None:
    """Non-zero, different ``lora_B`` per member (at init every member equals the base model), and
    different heads per member."""
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, std)
        for head in ensemble.heads.values():
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)


def left_padded(batch: int, length: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ``[batch, length]`` with ``pads[b]`` pad tokens (0) on the left of row ``b``."""
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def peft_copy(original: nn.Module, ensemble: LoRAEnsemble) -> nn.Module:
    """A peft model of a copy of ``original`` with adapters ``m0 .. m{N-1}``: adapter ``n`` holds
    member ``n``'s ``lora_A`` / ``lora_B`` of every wrapped layer and its heads (``modules_to_save``)."""
    import peft

    layers = ensemble.lora_layers()
    first = next(iter(layers.values()))
    config = peft.LoraConfig(
        r=ensemble.rank, lora_alpha=ensemble.alpha if ensemble.alpha is not None else ensemble.rank,
        use_rslora=ensemble.use_rslora, lora_dropout=ensemble.lora_dropout, target_modules=list(layers),
        fan_in_fan_out=first.fan_in_fan_out, modules_to_save=list(ensemble.head_names) or None)
    model = None
    for n in range(ensemble.num_members):
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(original), config, adapter_name="m0")
        else:
            model.add_adapter(f"m{n}", config)
    inner = model.base_model.model
    with torch.no_grad():
        for name, layer in layers.items():
            target = inner.get_submodule(name)
            for n in range(ensemble.num_members):
                target.lora_A[f"m{n}"].weight.copy_(layer.lora_A[n])
                target.lora_B[f"m{n}"].weight.copy_(layer.lora_B[n])
        for name, head in ensemble.heads.items():
            for n in range(ensemble.num_members):
                inner.get_submodule(name).modules_to_save[f"m{n}"].load_state_dict(head.merged_member(n).state_dict())
    return model.eval()


def peft_member(model: nn.Module, member: int) -> nn.Module:
    """``model`` (from :func:`peft_copy`) with adapter ``member`` active."""
    model.set_adapter(f"m{member}")
    return model
