"""peft's LoRA adapter folders: the format, and reading one without peft (for :mod:`lora_ensemble.io`,
which writes them too).

A folder written by peft's ``save_pretrained`` holds ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` (with ``safe_serialization=False``, older peft's default:
``adapter_model.bin``) with, for every target module ``<name>``,

* ``base_model.model.<name>.lora_A.weight`` ``[r, d]`` and ``base_model.model.<name>.lora_B.weight``
  ``[k, r]`` (``d`` in, ``k`` out features; an HF ``Conv1D`` too: peft's ``fan_in_fan_out`` only says how
  the base weight is read, and peft sets it from the layer's type whatever the config says),

and for every module of ``modules_to_save`` its parameters as ``base_model.model.<module>.<param>``.
Member ``n``'s delta at a target is ``scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``), ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern``.

Which modules an adapter targets and which it saves whole follow peft's own rules
(``check_target_module_exists``, ``get_pattern_key``, ``_set_trainable``: 0.21's and 0.22's, which
differ on ``modules_to_save``), restated here so that reading an adapter needs only safetensors; the
tests check them against the installed peft's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import check_field, read_json_object, read_pickled_tensors, read_safetensors
from .modules import is_hf_conv1d, lora_scaling
from .targets import is_base_layer

__all__ = ["CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "PeftAdapter", "read_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# adapter_config.json keys read below, and keys that do not change what a loaded LoRA adapter computes
# (fan_in_fan_out: peft sets it from the layer's type; the *_config of an initialisation: only that
# initialisation reads them, and the ones that change the base weights are refused by init_lora_weights).
# Any other key must be unset (None, False, empty or "none"): a LoRA variant this module does not implement.
_READ = frozenset({"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save",
                   "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "layers_to_transform",
                   "layers_pattern", "init_lora_weights", "bias"})
_INERT = frozenset({"task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                    "peft_version", "fan_in_fan_out", "runtime_config", "megatron_core", "qalora_group_size",
                    "loftq_config", "eva_config", "corda_config", "lora_ga_config"})
_UNSET = (None, False, "none", "", {}, [])
# Initialisations after which peft's adapter is relative to base weights peft changed (a residual).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class PeftAdapter:
    """One adapter folder, checked against a model (names are dotted names in that model).

    Attributes:
        folder: the folder.
        targets: the target modules, in model order.
        heads: the ``modules_to_save`` modules (those with parameters), in model order.
        rank: ``r``, the same for every target (a LoRAEnsemble has one rank).
        lora_alpha: the config's ``lora_alpha``.
        use_rslora: the config's ``use_rslora``.
        lora_dropout: the config's ``lora_dropout``.
        scalings: per target, peft's scaling (``alpha_pattern`` applied).
        lora: per target, ``(lora_A [r, d], lora_B [k, r])``.
        head_state: per head, its saved parameters by their names inside it.
    """

    folder: Path
    targets: list[str]
    heads: list[str]
    rank: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    scalings: dict[str, float]
    lora: dict[str, tuple[Tensor, Tensor]]
    head_state: dict[str, dict[str, Tensor]]


def _is_target(config: dict[str, Any], key: str) -> bool:
    """peft's ``check_target_module_exists`` for the dotted module name ``key``."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return False
    if any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in config.get("modules_to_save") or ()):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{name}") for name in targets)
    layers = config.get("layers_to_transform")
    if not found or layers is None or layers == []:
        return found
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern that matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _heads(config: dict[str, Any], modules: dict[str, nn.Module], saved: set[str]) -> list[str]:
    """peft's ``modules_to_save`` matching: a module named an entry or ending with ``"." + entry`` (peft
    >= 0.22), or whose name merely ends with an entry (``cls_classifier`` for ``classifier``: peft <= 0.21
    wrapped and saved those) where the adapter's tensors ``saved`` hold its parameters; outermost
    matches only, modules with parameters only (peft saves nothing of the others)."""
    entries = config.get("modules_to_save") or []
    heads: list[str] = []
    for name, module in modules.items():
        if not any(name.endswith(entry) for entry in entries) or any(name.startswith(f"{h}.") for h in heads):
            continue
        params = [f"{PREFIX}{name}.{p}" for p, _ in module.named_parameters()]
        on_boundary = any(name == entry or name.endswith(f".{entry}") for entry in entries)
        if params and (on_boundary or all(p in saved for p in params)):
            heads.append(name)
    return heads


# The types of the adapter_config.json keys read here: (kinds, list item type).
_KEY_TYPES: dict[str, tuple[tuple[type, ...], type | None]] = {
    "r": ((int,), None),
    "lora_alpha": ((float,), None),
    "target_modules": ((str, list), str),
    "exclude_modules": ((str, list, type(None)), str),
    "modules_to_save": ((list, type(None)), str),
    "rank_pattern": ((dict, type(None)), None),
    "alpha_pattern": ((dict, type(None)), None),
    "use_rslora": ((bool,), None),
    "lora_dropout": ((float,), None),
    "layers_to_transform": ((int, list, type(None)), int),
    "layers_pattern": ((str, list, type(None)), str),
    "init_lora_weights": ((bool, str), None),
    "bias": ((str,), None),
}


def _check_types(path: Path, config: dict[str, Any]) -> None:
    """Each key read here has peft's type (a ``ValueError`` naming the file and the key otherwise)."""
    for key, (kinds, items) in _KEY_TYPES.items():
        check_field(path, config, key, kinds, required=False, items=items)
    if config["r"] < 1:
        raise ValueError(f"{path}: r must be a positive int, got {config['r']!r}")
    for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (float,))):
        for pattern in (config.get(key) or {}):
            check_field(path, config[key], pattern, kinds, where=f"{key}.")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {folder}: no {CONFIG_FILE} (expected peft's save_pretrained output)")
    config = {"r": 8, "lora_alpha": 8, **read_json_object(path)}  # LoraConfig's defaults, as peft fills them
    _check_types(path, config)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {folder}: peft_type {config.get('peft_type')!r}, only LORA adapters can be loaded")
    for key, value in config.items():
        if key not in _READ and key not in _INERT and value not in _UNSET:
            raise ValueError(f"adapter {folder}: {key}={value!r} is a LoRA variant load_peft_adapters does not "
                             "implement (plain LoRA, rsLoRA, rank/alpha patterns and modules_to_save are supported)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {folder}: bias={config['bias']!r} trains the base layers' biases, which the members "
                         "of a LoRAEnsemble share; only bias='none' can be loaded")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"adapter {folder}: init_lora_weights={init!r} changes the base weights, so the adapter is "
                         "relative to a base this model does not have; convert it with peft first "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    targets = config.get("target_modules")
    if not targets:
        raise ValueError(f"adapter {folder}: no target_modules (target_parameters adapters are not supported)")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise ValueError(f"adapter {folder}: target_modules='all-linear' is a shorthand peft expands when it builds "
                         "the model; save the adapter with peft (its config then lists the modules)")
    return config


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / WEIGHTS_FILE).is_file():
        return read_safetensors(folder / WEIGHTS_FILE)
    if (folder / _PICKLED_WEIGHTS_FILE).is_file():
        return read_pickled_tensors(folder / _PICKLED_WEIGHTS_FILE)
    raise FileNotFoundError(f"adapter folder {folder}: neither {WEIGHTS_FILE} nor {_PICKLED_WEIGHTS_FILE}")


def _out_in(layer: nn.Module) -> tuple[int, int]:
    """``(k, d)`` of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is ``[d, k]``)."""
    if is_hf_conv1d(layer):
        d, k = layer.weight.shape
        return k, d
    return layer.out_features, layer.in_features


def _listed(keys: set[str], most: int = 6) -> str:
    ordered = sorted(keys)
    return ", ".join(ordered[:most]) + (f", ... ({len(ordered) - most} more)" if len(ordered) > most else "")


def read_adapter(folder: str | Path, model: nn.Module) -> PeftAdapter:
    """Read and check one peft adapter folder against ``model`` (not modified).

    Raises:
        FileNotFoundError: a folder without ``adapter_config.json`` or weights.
        ValueError: a config this reader does not implement (the message names the key), a target that
            is no ``nn.Linear`` / ``Conv1D`` or that the model lacks, modules whose ranks differ, missing or
            unexpected tensors, or a tensor whose shape is not the module's.
    """
    folder = Path(folder)
    config = _read_config(folder)
    modules = dict(model.named_modules())
    tensors = _read_weights(folder)
    heads = _heads(config, modules, set(tensors))
    targets = [name for name in modules if _is_target(config, name)]
    if not targets:
        raise ValueError(f"adapter {folder}: target_modules {config['target_modules']!r} match no module of "
                         f"{type(model).__name__}")
    for name in targets:
        if not is_base_layer(modules[name]):
            raise ValueError(f"adapter {folder}: target {name} is a {type(modules[name]).__name__}; a LoRAEnsemble "
                             "wraps nn.Linear and HF Conv1D layers only")
        head = next((head for head in heads if name.startswith(f"{head}.")), None)
        if head is not None:
            raise ValueError(f"adapter {folder}: target {name} lies inside modules_to_save module {head}")
    ranks = {name: _pattern_value(config.get("rank_pattern") or {}, name, config["r"]) for name in targets}
    if len(set(ranks.values())) > 1:
        first = targets[0]
        other = next(name for name in targets if ranks[name] != ranks[first])
        raise ValueError(f"adapter {folder}: module {other} has rank {ranks[other]} and module {first} rank "
                         f"{ranks[first]} (rank_pattern); a LoRAEnsemble has one rank for every layer and member")
    rank = ranks[targets[0]]
    use_rslora = bool(config.get("use_rslora", False))
    alphas = {name: _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]) for name in targets}
    scalings = {name: lora_scaling(alpha, rank, use_rslora) for name, alpha in alphas.items()}

    lora_keys = {f"{PREFIX}{name}.lora_{ab}.weight" for name in targets for ab in "AB"}
    head_params = {f"{PREFIX}{head}.{p}" for head in heads for p, _ in modules[head].named_parameters()}
    head_buffers = {f"{PREFIX}{head}.{b}" for head in heads for b, _ in modules[head].named_buffers()}
    missing = (lora_keys | head_params) - set(tensors)
    unexpected = set(tensors) - lora_keys - head_params - head_buffers
    if missing or unexpected:
        raise ValueError(f"adapter {folder}: its weights do not match its config on {type(model).__name__}: missing "
                         f"[{_listed(missing)}], unexpected [{_listed(unexpected)}] (a LoRA factor of every target, "
                         "the parameters of every modules_to_save module and nothing else)")
    lora: dict[str, tuple[Tensor, Tensor]] = {}
    for name in targets:
        k, d = _out_in(modules[name])
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        if a.shape != (rank, d) or b.shape != (k, rank):
            raise ValueError(f"adapter {folder}: module {name} has lora_A {tuple(a.shape)} and "
                             f"lora_B {tuple(b.shape)}; "
                             f"rank {rank} on this model's layer ({d} in, {k} out) needs {(rank, d)} and {(k, rank)}")
        lora[name] = (a, b)
    head_state: dict[str, dict[str, Tensor]] = {}
    for head in heads:
        head_state[head] = {}
        for key, own in modules[head].named_parameters():
            saved = head_state[head][key] = tensors[f"{PREFIX}{head}.{key}"]
            if saved.shape != own.shape:
                raise ValueError(f"adapter {folder}: {head}.{key} has shape {tuple(saved.shape)}, the model's "
                                 f"{tuple(own.shape)}")
        for key, own in modules[head].named_buffers():
            saved = tensors.get(f"{PREFIX}{head}.{key}")
            if saved is not None and (saved.shape != own.shape or not torch.equal(saved.to(own), own)):
                raise ValueError(f"adapter {folder}: buffer {head}.{key} differs from the model's; the members' "
                                 "copies of a head share its buffers")
    return PeftAdapter(folder=folder, targets=targets, heads=heads, rank=rank, lora_alpha=config["lora_alpha"],
                       use_rslora=use_rslora, lora_dropout=float(config.get("lora_dropout", 0.0)),
                       scalings=scalings, lora=lora, head_state=head_state)
