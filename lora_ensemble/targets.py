"""Which layers of a model a :class:`~lora_ensemble.LoRAEnsemble` wraps, and which are its heads.

Families are told apart by their module structure (a marker name that only that family's attention
has), never by class name:

| family | marker | LoRA targets |
|---|---|---|
| timm ViT | ``attn.qkv`` | ``attn.qkv``, ``attn.proj`` |
| torchvision ViT (after the MHA swap) | ``self_attention.q_proj`` | ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` |
| HF BERT, RoBERTa | ``attention.self.query`` | ``query``, ``key``, ``value``, ``attention.output.dense`` |
| HF ViT, DeiT, AST (transformers 4.x naming) | ``attention.attention.query`` | the same four |
| HF Phi-3 | ``self_attn.qkv_proj`` | ``self_attn.qkv_proj``, ``self_attn.o_proj`` |
| HF Llama, Mistral, Qwen2, Gemma; ViT, DeiT, AST (5.x) | ``o_proj`` | ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` |
| HF GPT-2 (``Conv1D`` layers) | ``attn.c_attn`` | ``attn.c_attn``, ``attn.c_proj`` |

Heads (``head="auto"``): a model with a language-model head (HF ``get_output_embeddings()`` returns
a module: causal LMs, masked LMs) keeps it as one shared frozen layer, so it has no per-member head.
An HF model with a task head has its backbone under ``model.base_model_prefix``; every other
top-level child holding parameters is a head (``classifier``; RoBERTa's two-layer ``classifier``;
DeiT's ``cls_classifier`` and ``distillation_classifier``). Other models: the first ``nn.Linear``
among ``head``, ``heads.head``, ``classifier``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from .modules import is_hf_conv1d

__all__ = ["TargetSpec", "find_heads", "has_lm_head", "is_base_layer", "resolve_target_modules"]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]

# (marker that identifies the family, patterns wrapped). Patterns match a module's dotted name, or
# its tail after a dot. First match wins: the order matters where markers overlap.
_FAMILY_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.qkv", ("attn.qkv", "attn.proj")),                                # timm VisionTransformer
    ("self_attention.q_proj", ("q_proj", "k_proj", "v_proj", "out_proj")),  # torchvision ViT (converted MHA)
    ("attention.self.query", ("query", "key", "value", "attention.output.dense")),       # HF BERT, RoBERTa
    ("attention.attention.query", ("query", "key", "value", "attention.output.dense")),  # HF ViT/DeiT/AST 4.x
    ("self_attn.qkv_proj", ("self_attn.qkv_proj", "self_attn.o_proj")),    # HF Phi-3 (fused qkv)
    ("o_proj", ("q_proj", "k_proj", "v_proj", "o_proj")),  # HF Llama, Mistral, Qwen2, Gemma; ViT/DeiT/AST 5.x
    ("attn.c_attn", ("attn.c_attn", "attn.c_proj")),                        # HF GPT-2 (Conv1D)
)
_HEAD_NAMES: tuple[str, ...] = ("head", "heads.head", "classifier", "fc")
_LISTED = 12  # candidate names quoted in an error message


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def is_base_layer(module: nn.Module) -> bool:
    """Whether ``module`` can be the frozen base of a LoRA layer: an ``nn.Linear`` or HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _candidates(names: Sequence[str]) -> str:
    """The distinct tails first (what a pattern usually names), then a few full names."""
    tails = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(list(names)[:_LISTED]) + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")
    return f"candidate tails: {tails}; names: [{shown}]"


def resolve_target_modules(model: nn.Module, target_modules: TargetSpec | None,
                           exclude: Sequence[str] = ()) -> list[str]:
    """Dotted names of the base layers (``nn.Linear`` or HF ``Conv1D``) of ``model`` that
    ``target_modules`` selects, in model order.

    Args:
        model: the backbone.
        target_modules: a name or glob pattern, a list of them (each matches a module's full dotted
            name or its tail after a dot: ``"qkv"`` matches ``"blocks.0.attn.qkv"``), a predicate
            ``(name, module) -> bool``, or None for the attention projections of a known family
            (see the module docstring).
        exclude: names never selected (the classification heads).

    Raises:
        ValueError: a pattern that selects no base layer (the message lists the candidates), or
            None for a model of no known family.
    """
    layers = {name: m for name, m in model.named_modules() if is_base_layer(m) and name not in exclude}
    if callable(target_modules):
        chosen = [name for name, m in layers.items() if target_modules(name, m)]
        if not chosen:
            raise ValueError(f"target_modules predicate selected no nn.Linear / Conv1D of {type(model).__name__}; "
                             f"{_candidates(list(layers))}")
        return chosen
    if target_modules is None:
        for marker, patterns in _FAMILY_TARGETS:
            if any(_matches(name, marker) for name in layers):
                target_modules = patterns
                break
        else:
            raise ValueError(f"target_modules=None knows no layer of {type(model).__name__} (families: timm, "
                             "torchvision and HF ViT/DeiT/AST, BERT/RoBERTa, Llama/Mistral/Qwen2/Gemma/Phi-3, "
                             f"GPT-2); pass names, patterns or a predicate. {_candidates(list(layers))}")
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name in layers if _matches(name, pattern)]
        if not hits:
            raise ValueError(f"target_modules entry {pattern!r} matches no nn.Linear / Conv1D in "
                             f"{type(model).__name__}; {_candidates(list(layers))}")
        chosen += [name for name in hits if name not in chosen]
    return [name for name in layers if name in chosen]


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` is an HF language model (``get_output_embeddings()`` returns its LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and isinstance(get(), nn.Module)


def find_heads(model: nn.Module, head: str | Sequence[str] | None) -> list[str]:
    """Dotted names of the modules that become per-member heads (see the module docstring).

    Args:
        model: the model.
        head: ``"auto"``, a dotted name, a list of them, or None (no per-member head).

    Raises:
        ValueError: ``"auto"`` found no head on a model that is neither an HF model nor has one of the
            usual names, or a named head that is not a module with parameters.
    """
    if head is None:
        return []
    modules = dict(model.named_modules())
    if head == "auto":
        if has_lm_head(model):
            return []
        prefix = getattr(model, "base_model_prefix", None)
        if isinstance(prefix, str) and isinstance(getattr(model, prefix, None), nn.Module):
            return [name for name, child in model.named_children()
                    if name != prefix and any(True for _ in child.parameters())]
        found = [n for n in _HEAD_NAMES if isinstance(modules.get(n), nn.Linear)]
        if not found:
            raise ValueError(f"head='auto' found none of {_HEAD_NAMES} as an nn.Linear in "
                             f"{type(model).__name__}; pass head=<name> or head=None")
        return found[:1]
    names = [head] if isinstance(head, str) else list(head)
    for name in names:
        module = modules.get(name)
        if module is None or not any(True for _ in module.parameters()):
            children = sorted(n for n, c in model.named_children() if any(True for _ in c.parameters()))
            raise ValueError(f"head {name!r} is not a module with parameters in {type(model).__name__}; "
                             f"top-level candidates: {children}")
    return names
