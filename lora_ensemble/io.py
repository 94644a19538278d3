"""Save and load the members of a :class:`~lora_ensemble.LoRAEnsemble`, and export one member.

Only what the members own is saved: every wrapped layer's ``lora_A [N, r, d]`` / ``lora_B [N, k, r]``
and the per-member heads (``weight [N, C, H]``, ``bias [N, C]``; a module head's parameters ``[N, ...]``),
in one safetensors file keyed by the parameter's name inside the model (``blocks.0.attn.qkv.lora_A``,
``head.weight``), next to a small JSON config (members, rank, alpha, LoRA options, target layer names,
head names, replication options). The
frozen backbone is not saved: :func:`load_members` re-attaches the members to a fresh copy of it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .ensemble import LoRAEnsemble

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_member", "load_members", "save_members"]

CONFIG_NAME = "lora_ensemble.json"
WEIGHTS_NAME = "members.safetensors"
_FORMAT_VERSION = 1


def _member_state(ensemble: LoRAEnsemble) -> dict[str, torch.Tensor]:
    return {name: p for name, p in ensemble.model.named_parameters() if p.requires_grad}


def save_members(ensemble: LoRAEnsemble, directory: str | Path) -> Path:
    """Write ``directory/members.safetensors`` and ``directory/lora_ensemble.json``.

    Returns:
        ``directory`` as a Path (created if missing).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in _member_state(ensemble).items()}
    config: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "num_members": ensemble.num_members,
        "rank": ensemble.rank,
        "alpha": ensemble.alpha,
        "use_rslora": ensemble.use_rslora,
        "lora_dropout": ensemble.lora_dropout,
        "init": ensemble.init,
        "init_gain": ensemble.init_gain,
        "target_modules": list(ensemble.target_names),
        "head": list(ensemble.head_names),
        "num_classes": ensemble.num_classes,
        "replicate_at": ensemble.replicate_at,
        "share_first_input": ensemble.share_first_input,
    }
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_members(model: nn.Module, directory: str | Path, backend: str = "auto") -> LoRAEnsemble:
    """Wrap a fresh ``model`` (the same backbone the members were trained on) and load the members.

    The tensors are moved to the device and dtype of the model's parameters.

    Raises:
        ValueError: a file format this version cannot read, a target layer the model lacks, or
            saved tensors whose names or shapes do not match the wrapped model.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME}: format_version {config.get('format_version')!r} "
                         f"is not {_FORMAT_VERSION}")
    targets = set(config["target_modules"])
    ensemble = LoRAEnsemble(
        model, config["num_members"], config["rank"],
        target_modules=lambda name, module: name in targets,
        alpha=config["alpha"], head=config["head"], num_classes=config["num_classes"],
        init_gain=config["init_gain"], backend=backend, init=config.get("init", "paper"),
        use_rslora=config.get("use_rslora", False), lora_dropout=config.get("lora_dropout", 0.0),
        replicate_at=config["replicate_at"], share_first_input=config["share_first_input"],
    )
    if set(ensemble.target_names) != targets:
        raise ValueError(f"the model has no nn.Linear / Conv1D named {sorted(targets - set(ensemble.target_names))} "
                         "(saved target_modules)")
    saved = load_file(str(directory / WEIGHTS_NAME))
    params = _member_state(ensemble)
    if set(saved) != set(params):
        raise ValueError(f"saved tensors do not match the wrapped model: missing {sorted(set(params) - set(saved))}, "
                         f"unexpected {sorted(set(saved) - set(params))}")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"saved {name} has shape {tuple(saved[name].shape)}, the model's is {tuple(p.shape)}")
            p.copy_(saved[name])
    return ensemble


def export_member(ensemble: LoRAEnsemble, member: int) -> nn.Module:
    """Member ``member`` as a plain model: a copy of the backbone with ``W0 + s B[n] A[n]`` merged
    into each wrapped layer (a plain ``nn.Linear``, or HF ``Conv1D`` where the base was one) and the
    member's heads as plain modules (an ``nn.Linear``, or the member's copy of a module head).

    The copy shares nothing with the ensemble, takes an ordinary (un-replicated) batch and has every
    parameter trainable, as a freshly built model would. Converted
    ``nn.MultiheadAttention`` modules stay as the equivalent ``ExplicitMultiheadAttention``.
    """
    if not 0 <= member < ensemble.num_members:
        raise IndexError(f"member must be in [0, {ensemble.num_members}), got {member}")
    memo: dict[int, Any] = {id(layer): layer.merged_member(member) for layer in ensemble.lora_layers().values()}
    for head in ensemble.heads.values():
        memo[id(head)] = head.merged_member(member)
    with ensemble.hooks_removed():
        plain = copy.deepcopy(ensemble.model, memo)
    plain.requires_grad_(True)
    return plain
