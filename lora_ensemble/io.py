"""Save and load the members of a :class:`~lora_ensemble.LoRAEnsemble`, export one member, and convert
from and to peft LoRA adapters.

:func:`save_members` writes only what the members own: every wrapped layer's ``lora_A [N, r, d]`` /
``lora_B [N, k, r]`` and the per-member heads (``weight [N, C, H]``, ``bias [N, C]``; a module head's
parameters ``[N, ...]``), in one safetensors file keyed by the parameter's name inside the model
(``blocks.0.attn.qkv.lora_A``, ``head.weight``), next to a small JSON config: members, rank, alpha, LoRA
options, target layer names, head names, replication options, and a record of the base the members were
trained on (its class, HF ``model_type`` and ``_name_or_path``, each wrapped layer's ``[k, d]``, and a
fingerprint of every other parameter and buffer of the wrapped model, the base's: shape, dtype, float64
norm and 8 entries at fixed positions). The frozen backbone is not saved: :func:`load_members` re-attaches
the members to a fresh copy of it and refuses a different one.

:func:`load_peft_adapters` makes member ``n`` of a new ensemble peft adapter ``n`` (a ``save_pretrained``
folder), and :func:`save_peft_adapters` writes one such folder per member; see
:mod:`lora_ensemble.peft_format` for the format.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._optional import optional_dependency

with optional_dependency("lora_ensemble.io"):
    from safetensors.torch import save_file

from .attention import ExplicitMultiheadAttention
from .ensemble import LoRAEnsemble, _undone_on_error
from .files import check_field, read_json_object, read_safetensors
from .peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, read_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_member", "load_members", "load_peft_adapters", "save_members",
           "save_peft_adapters"]

CONFIG_NAME = "lora_ensemble.json"
WEIGHTS_NAME = "members.safetensors"
# 3: the base record fingerprints every base tensor; 2 (read too): the base record holds 64 entries of each
# wrapped layer's W0 only, and adapter_dtype; 1 (read too): neither.
_FORMAT_VERSION = 3
_SAMPLES = 64  # entries of W0 recorded per wrapped layer (format 2)
_TENSOR_SAMPLES = 8  # entries recorded per base tensor (format 3)
# Two W0 samples of format 2 are one base when every entry agrees within this fraction of itself plus of
# the sample's RMS: a base cast to bf16 / fp16 passes, a different model's weights do not.
_SAMPLE_TOLERANCE = 2.0**-7
# Base tensors recorded in one dtype and compared in the same dtype must agree to this relative
# tolerance (the same values: only the float64 norm's summation order may differ).
_SAME_DTYPE_TOLERANCE = 1e-9
# LoRAEnsemble arguments that load_peft_adapters takes from the adapters.
_SET_BY_ADAPTERS = frozenset({"num_members", "rank", "target_modules", "alpha", "use_rslora", "head", "num_classes",
                              "init", "init_gain", "allow_rank_above_size"})


def _wrap(model: nn.Module, fill: Callable[[LoRAEnsemble], None], **options: Any) -> LoRAEnsemble:
    """``LoRAEnsemble(model, **options)``, then ``fill(ensemble)``; if either raises, ``model`` is given
    back as it was (its modules, ``requires_grad`` flags and hooks). The ensemble is in ``model``'s
    train / eval mode (the layers and heads it adds too)."""
    training = model.training
    with _undone_on_error(model):
        ensemble = LoRAEnsemble(model, **options)
        try:
            fill(ensemble)
        except BaseException:
            ensemble._remove_hooks()
            raise
    return ensemble.train(training)


def _weight_sample(layer: nn.Module, k: int, d: int) -> list[float] | None:
    """``_SAMPLES`` entries of the layer's ``W0 [k, d]`` at fixed positions spread evenly over it (as
    float64), or None when the layer holds no floating-point ``W0`` of that shape (a quantized base)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        return None
    weight = weight.t() if getattr(layer, "fan_in_fan_out", False) else weight
    if tuple(weight.shape) != (k, d):
        return None
    count = min(_SAMPLES, k * d)
    flat = torch.tensor([i * (k * d - 1) // max(count - 1, 1) for i in range(count)], device=weight.device)
    return weight.detach()[flat // d, flat % d].double().tolist()


def _tensor_fingerprint(tensor: Tensor) -> dict[str, Any]:
    """``shape``, ``dtype`` and, for a plain tensor with values, its float64 ``norm`` and
    ``_TENSOR_SAMPLES`` entries at fixed positions spread evenly over it (``sample``, as float64). A
    tensor subclass (a quantized weight: packed, or computed) or a meta tensor gets shape and dtype only."""
    record: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if type(tensor) not in (Tensor, nn.Parameter) or tensor.is_meta or tensor.numel() == 0:
        return record
    flat = tensor.detach().reshape(-1)
    count = min(_TENSOR_SAMPLES, flat.numel())
    positions = torch.tensor([i * (flat.numel() - 1) // max(count - 1, 1) for i in range(count)], device=flat.device)
    values = flat if flat.is_floating_point() else flat.double()
    record["norm"] = float(torch.linalg.vector_norm(values, dtype=torch.float64))
    record["sample"] = flat[positions].double().tolist()
    return record


def _base_tensors(ensemble: LoRAEnsemble) -> dict[str, Tensor]:
    """Every parameter and buffer of ``ensemble.model`` that the members do not own (the base's), by name."""
    members = {id(p) for p in ensemble.member_parameters().values()}
    named = [*ensemble.model.named_parameters(), *ensemble.model.named_buffers()]
    return {name: t for name, t in named if id(t) not in members}


def _base_record(ensemble: LoRAEnsemble) -> dict[str, Any]:
    """What identifies the base of ``ensemble``: class, HF ``model_type`` / ``_name_or_path`` (None when
    not an HF model), per wrapped layer ``[k, d]``, and a fingerprint of every base tensor
    (:func:`_tensor_fingerprint`)."""
    model = ensemble.model
    config = getattr(model, "config", None)
    layers = {name: {"shape": [layer.lora_B.shape[1], layer.lora_A.shape[2]]}
              for name, layer in ensemble.lora_layers().items()}
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None,
            "layers": layers,
            "tensors": {name: _tensor_fingerprint(t) for name, t in _base_tensors(ensemble).items()}}


def _same_sample(saved: list[float], current: list[float]) -> bool:
    a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(current, dtype=torch.float64)
    rms = a.square().mean().sqrt()
    return a.shape == b.shape and bool(((a - b).abs() <= _SAMPLE_TOLERANCE * (a.abs() + rms)).all())


def _rounding(saved_dtype: str, current_dtype: str) -> float:
    """The relative tolerance of a base tensor recorded in ``saved_dtype`` and compared in ``current_dtype``:
    the rounding of the lower precision of the two (a base cast to bf16 is the same base), or
    :data:`_SAME_DTYPE_TOLERANCE` when the dtypes agree (the values must too)."""
    if saved_dtype == current_dtype:
        return _SAME_DTYPE_TOLERANCE
    dtypes = [getattr(torch, name, None) for name in (saved_dtype, current_dtype)]
    eps = [torch.finfo(d).eps for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(eps, default=0.0)


def _tensor_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How one base tensor's fingerprint differs from the saved one, or None."""
    if saved["shape"] != current["shape"]:
        return f"shape {saved['shape']} (saved) vs {current['shape']}"
    if "norm" not in saved or "norm" not in current:
        return None  # a quantized or meta tensor: its shape is all there is to compare
    tol = _rounding(saved["dtype"], current["dtype"])
    a, b = torch.tensor(saved["sample"], dtype=torch.float64), torch.tensor(current["sample"], dtype=torch.float64)
    if not bool(((a - b).abs() <= tol * (a.abs() + a.square().mean().sqrt())).all()):
        worst = int((a - b).abs().argmax())
        return f"entry {worst} of its sample {a[worst].item():.6g} (saved) vs {b[worst].item():.6g}"
    if abs(saved["norm"] - current["norm"]) > tol * saved["norm"]:
        return f"norm {saved['norm']:.8g} (saved) vs {current['norm']:.8g}"
    return None


def _listed(items: list[str], total: int, what: str) -> str:
    return f"{what} of {len(items)} of {total}: {'; '.join(items[:4])}" + (" ..." if len(items) > 4 else "")


def _base_differences(saved: dict[str, Any], ensemble: LoRAEnsemble) -> list[str]:
    """How the base of ``ensemble`` differs from the ``saved`` record (empty when it does not), the first
    differing tensors named."""
    current = _base_record(ensemble)
    found = [f"{key} {saved[key]!r} (saved) vs {current[key]!r}" for key in ("class", "model_type")
             if saved[key] != current[key]]
    shapes, weights = [], []
    for name, layer in saved["layers"].items():
        now = current["layers"][name]
        if layer["shape"] != now["shape"]:
            shapes.append(f"{name} {layer['shape']} (saved) vs {now['shape']}")
        elif "tensors" not in saved and layer.get("sample") is not None:  # format 2: the wrapped W0 only
            sample = _weight_sample(ensemble.model.get_submodule(name), *now["shape"])
            if sample is not None and not _same_sample(layer["sample"], sample):
                weights.append(name)
    if shapes:
        found.append(_listed(shapes, len(saved["layers"]), "the shapes [k, d] of wrapped layers"))
    if weights:
        found.append(_listed(weights, len(saved["layers"]), "the weights W0 (fingerprint) of wrapped layers"))
    if "tensors" in saved:
        tensors = current["tensors"]
        missing = [name for name in saved["tensors"] if name not in tensors]
        extra = [name for name in tensors if name not in saved["tensors"]]
        differing = [f"{name}: {why}" for name, record in saved["tensors"].items() if name in tensors
                     for why in [_tensor_difference(record, tensors[name])] if why is not None]
        total = len(saved["tensors"])
        if differing:
            found.append(_listed(differing, total, "the values (fingerprint) of base tensors"))
        if missing:
            found.append(_listed(missing, total, "base tensors the model lacks"))
        if extra:
            found.append(_listed(extra, len(tensors), "base tensors the saved base lacked"))
    return found


def _check_base(saved: dict[str, Any] | None, ensemble: LoRAEnsemble, directory: Path, strict_base: bool) -> None:
    if saved is None:
        warnings.warn(f"{directory / CONFIG_NAME} records nothing about the base the members were trained on "
                      "(written before format_version 2): the model cannot be checked", stacklevel=5)
        return
    if "tensors" not in saved:
        warnings.warn(f"{directory / CONFIG_NAME} records only the wrapped layers' W0 of the base (format_version "
                      "2): the base's other tensors cannot be checked", stacklevel=5)
    found = _base_differences(saved, ensemble)
    if not found:
        return
    message = (f"the model is not the base the members in {directory} were trained on"
               f"{' (' + repr(saved['name_or_path']) + ')' if saved['name_or_path'] else ''}: {'; '.join(found)}")
    if strict_base:
        raise ValueError(f"{message}. Pass strict_base=False to load them anyway")
    warnings.warn(f"{message}; loading anyway (strict_base=False)", stacklevel=5)


def save_members(ensemble: LoRAEnsemble, directory: str | Path) -> Path:
    """Write ``directory/members.safetensors`` and ``directory/lora_ensemble.json`` (see the module docstring).

    Returns:
        ``directory`` as a Path (created if missing).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in ensemble.member_parameters().items()}
    adapter_dtype = getattr(ensemble, "adapter_dtype", None)
    config: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "num_members": ensemble.num_members,
        "rank": ensemble.rank,
        "alpha": ensemble.alpha,
        "use_rslora": ensemble.use_rslora,
        "lora_dropout": ensemble.lora_dropout,
        "init": ensemble.init,
        "init_gain": ensemble.init_gain,
        "adapter_dtype": None if adapter_dtype is None else str(adapter_dtype).removeprefix("torch."),
        "target_modules": list(ensemble.target_names),
        "head": list(ensemble.head_names),
        "num_classes": ensemble.num_classes,
        "replicate_at": ensemble.replicate_at,
        "share_first_input": ensemble.share_first_input,
        "base": _base_record(ensemble),
    }
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _member_indices(members: Sequence[int] | slice | None, count: int) -> list[int]:
    """``members`` as indices into ``range(count)``, in the given order."""
    if members is None:
        return list(range(count))
    if isinstance(members, slice):
        chosen = list(range(count)[members])
    elif isinstance(members, Sequence) and all(isinstance(m, int) and not isinstance(m, bool) for m in members):
        outside = [m for m in members if not -count <= m < count]
        if outside:
            raise ValueError(f"members {outside} are outside the {count} saved members")
        chosen = [m % count for m in members]
    else:
        raise TypeError(f"members must be a slice or a sequence of ints, got {members!r}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"members must select at least one of the {count} saved members, each once; got {members!r}")
    return chosen


def _read_members_config(path: Path) -> dict[str, Any]:
    """``lora_ensemble.json`` of :func:`save_members`, every key :func:`load_members` reads checked: a
    ``ValueError`` naming the file and the key at fault (or ``FileNotFoundError``)."""
    config = read_json_object(path)
    if config.get("format_version") not in (1, 2, _FORMAT_VERSION):
        raise ValueError(f"{path}: format_version {config.get('format_version')!r} is not 1, 2 or {_FORMAT_VERSION}")
    for key in ("num_members", "rank"):
        if check_field(path, config, key, (int,)) < 1:
            raise ValueError(f"{path}: {key} must be a positive int, got {config[key]!r}")
    check_field(path, config, "alpha", (float, type(None)))
    check_field(path, config, "init_gain", (float,))
    check_field(path, config, "target_modules", (list,), items=str)
    check_field(path, config, "head", (list,), items=str)
    check_field(path, config, "num_classes", (int, type(None)))
    check_field(path, config, "replicate_at", (str, type(None)))
    check_field(path, config, "share_first_input", (bool,))
    for key, kinds in (("init", (str,)), ("use_rslora", (bool,)), ("lora_dropout", (float,)),
                       ("adapter_dtype", (str, type(None))), ("base", (dict, type(None)))):
        check_field(path, config, key, kinds, required=False)
    if isinstance(config.get("adapter_dtype"), str) and not isinstance(getattr(torch, config["adapter_dtype"], None),
                                                                       torch.dtype):
        raise ValueError(f"{path}: adapter_dtype {config['adapter_dtype']!r} names no torch dtype")
    if config.get("base") is not None:
        _check_base_record(path, config["base"], config["target_modules"])
    return config


def _check_base_record(path: Path, base: dict[str, Any], target_modules: list[str]) -> None:
    """The ``base`` record of ``lora_ensemble.json`` has the keys and types :func:`_base_differences` reads."""
    for key, kinds in (("class", (str,)), ("model_type", (str, type(None))), ("name_or_path", (str, type(None))),
                       ("layers", (dict,))):
        check_field(path, base, key, kinds, where="base.")
    check_field(path, base, "tensors", (dict,), required=False, where="base.")
    if set(base["layers"]) != set(target_modules):
        odd = sorted(set(base["layers"]) ^ set(target_modules))
        raise ValueError(f"{path}: base.layers and target_modules name different layers ({odd[:4]}): the file was "
                         "edited or damaged")
    for name, layer in base["layers"].items():
        if not (isinstance(layer, dict) and isinstance(layer.get("shape"), list)):
            raise ValueError(f"{path}: base.layers.{name} must be an object with a shape, got {layer!r}")
    for name, tensor in base.get("tensors", {}).items():
        if not (isinstance(tensor, dict) and isinstance(tensor.get("shape"), list)
                and isinstance(tensor.get("dtype"), str) and ("norm" in tensor) == ("sample" in tensor)):
            raise ValueError(f"{path}: base.tensors.{name} must be an object with shape, dtype and optionally norm "
                             f"and sample, got {tensor!r}")


def load_members(
    model: nn.Module,
    directory: str | Path,
    backend: str = "auto",
    *,
    members: Sequence[int] | slice | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    strict_base: bool = True,
) -> LoRAEnsemble:
    """Wrap a fresh ``model`` (the same backbone the members were trained on) and load the members.

    Args:
        model: the backbone, unwrapped; it is wrapped in place (as by :class:`LoRAEnsemble`) and is left
            as it was if loading fails.
        directory: what :func:`save_members` wrote.
        backend: the fused op's backend.
        members: which saved members to load, in this order: a slice (``slice(0, 4)``, ``slice(None, None,
            2)``) or a sequence of indices (``[3, 0]``; negative ones count from the end; each at most once).
            Member ``i`` of the result is saved member ``members[i]``. None: all of them.
        device: move the model and the members there (None: where the model is).
        dtype: the dtype the LoRA factors are kept in, as ``LoRAEnsemble(adapter_dtype=...)`` (None: the
            saved ensemble's ``adapter_dtype``, whose own None means the base's dtype). The base keeps its
            dtype; to load members into a base of another dtype (trained in fp32, run in bf16) cast the
            model before loading: every saved tensor is cast to the dtype of the parameter it loads into.
        strict_base: refuse a model that is not the base the members were saved from (its class, HF
            ``model_type``, a wrapped layer's shape, or any base parameter or buffer: its shape and the
            fingerprint of its values, exact in the saved dtype, within the lower precision's rounding in
            another), naming the first differing tensors. False: load anyway, with a warning that says what
            differs. Files of format 2 are checked on the wrapped layers' ``W0`` only, with a warning; files
            written before the record existed load with a warning that nothing could be checked.

    Returns:
        The ensemble, in ``model``'s train / eval mode (the layers and heads it adds too).

    Raises:
        FileNotFoundError: a missing config or weights file.
        ValueError: a damaged file (not JSON, a key missing or of the wrong type, weights safetensors cannot
            read; the message names the file and the key), a file format this version cannot read, a target
            layer the model lacks, saved tensors
            whose names or shapes do not match the wrapped model, a different base (``strict_base``), or
            ``members`` outside the saved ones or naming one twice.
        TypeError: ``members`` of another type.
    """
    directory = Path(directory)
    config = _read_members_config(directory / CONFIG_NAME)
    chosen = _member_indices(members, config["num_members"])
    saved = read_safetensors(directory / WEIGHTS_NAME)
    targets = set(config["target_modules"])
    adapter_dtype = dtype if dtype is not None else config.get("adapter_dtype")
    options = {} if adapter_dtype is None else {"adapter_dtype": getattr(torch, adapter_dtype)
                                                if isinstance(adapter_dtype, str) else adapter_dtype}

    def fill(ensemble: LoRAEnsemble) -> None:
        if set(ensemble.target_names) != targets:
            raise ValueError(f"the model has no nn.Linear / Conv1D named "
                             f"{sorted(targets - set(ensemble.target_names))} (saved target_modules)")
        _check_base(config.get("base"), ensemble, directory, strict_base)
        params = ensemble.member_parameters()
        if set(saved) != set(params):
            raise ValueError(f"saved tensors do not match the wrapped model: missing "
                             f"{sorted(set(params) - set(saved))}, unexpected {sorted(set(saved) - set(params))}")
        for name, p in params.items():
            if saved[name].shape != (config["num_members"], *p.shape[1:]):
                raise ValueError(f"saved {name} has shape {tuple(saved[name].shape)}, the model's is "
                                 f"{(config['num_members'], *p.shape[1:])} for {config['num_members']} members")
        if device is not None:
            ensemble.to(device)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name][chosen])

    return _wrap(
        model, fill, num_members=len(chosen), rank=config["rank"],
        target_modules=lambda name, module: name in targets,
        alpha=config["alpha"], head=config["head"], num_classes=config["num_classes"],
        init_gain=config["init_gain"], backend=backend, init=config.get("init", "paper"),
        use_rslora=config.get("use_rslora", False), lora_dropout=config.get("lora_dropout", 0.0),
        replicate_at=config["replicate_at"], share_first_input=config["share_first_input"],
        allow_rank_above_size=True, **options,
    )


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


def load_peft_adapters(
    model: nn.Module,
    adapter_dirs: Sequence[str | Path],
    *,
    adapter_dtype: torch.dtype | None = None,
    **lora_ensemble_options: Any,
) -> LoRAEnsemble:
    """Wrap ``model`` so that member ``n`` is peft LoRA adapter ``adapter_dirs[n]``: the same outputs as
    ``PeftModel.from_pretrained(model, adapter_dirs[n])`` (needs only safetensors, not peft).

    Each folder is peft's ``save_pretrained`` output. From its ``adapter_config.json``: the targets
    (``target_modules`` as a list of names or suffixes or as a regex, ``exclude_modules``,
    ``layers_to_transform``: peft's rules), rank and alpha (with ``rank_pattern`` / ``alpha_pattern``),
    ``use_rslora``, ``lora_dropout`` and ``modules_to_save``, whose modules become per-member heads
    (:class:`~lora_ensemble.EnsembleHead` for an ``nn.Linear``, else
    :class:`~lora_ensemble.PerMemberModule`) holding each adapter's copy. GPT-2's ``Conv1D`` layers
    (peft's ``fan_in_fan_out``) are wrapped as such.

    A rank above a target's ``min(in_features, out_features)``, which peft saves and a fresh
    :class:`LoRAEnsemble` refuses, is loaded as it is (the outputs must be the adapter's).

    Alpha: a wrapped layer has one ``scaling`` for all members. The ensemble takes adapter 0's
    ``lora_alpha`` and ``use_rslora`` (so every layer's scaling is adapter 0's ``s0 = alpha / r``, or
    ``alpha / sqrt(r)``); where adapter ``n``'s scaling ``s_n`` at a layer differs from it (another alpha,
    an ``alpha_pattern`` entry, rsLoRA in one adapter only), ``lora_B[n]`` holds ``B_n * s_n / s0`` (computed
    in float64), which computes the same delta. :func:`save_peft_adapters` then writes that member with
    ``s0`` and the scaled ``B``: the same outputs, not the same file.

    Args:
        model: the base model the adapters were trained on, unwrapped (wrapped in place; left as it was
            if loading fails).
        adapter_dirs: the adapter folders, one per member (at least one).
        adapter_dtype: the dtype of the LoRA factors, as ``LoRAEnsemble(adapter_dtype=...)``; None: the
            ensemble's default (the base's dtype). Loaded tensors are cast to it.
        lora_ensemble_options: other :class:`LoRAEnsemble` arguments (``backend``, ``replicate_at``,
            ``share_first_input``, ``member_chunk_size``, ``lora_dropout``); the ones the adapters set
            (targets, rank, alpha, rsLoRA, heads, init) are refused. ``lora_dropout`` defaults to adapter
            0's; adapters that disagree on it get a warning (it only matters in training).

    Returns:
        The ensemble, in ``model``'s train / eval mode (the layers and heads it adds too).

    Raises:
        TypeError: ``adapter_dirs`` is not a sequence of folders, or an option the adapters set.
        FileNotFoundError: a folder without ``adapter_config.json`` or weights.
        ValueError: a damaged file (not JSON, a key of the wrong type, unreadable weights; the message names
            the file and the key), or an adapter this function cannot represent, naming the folder and the
            module:
            another peft method or LoRA variant (DoRA, ``bias``, PiSSA-style init, ...), a target that is no
            ``nn.Linear`` / ``Conv1D``, ranks that differ between modules or adapters, adapters that target
            different modules or save different heads, weights that do not match the config or the model.
    """
    if isinstance(adapter_dirs, (str, Path)) or not isinstance(adapter_dirs, Sequence) or not adapter_dirs:
        raise TypeError(f"adapter_dirs must be a non-empty list of adapter folders, one per member, got "
                        f"{adapter_dirs!r}")
    refused = sorted(_SET_BY_ADAPTERS & set(lora_ensemble_options))
    if refused:
        raise TypeError(f"load_peft_adapters takes {refused} from the adapters' configs; do not pass them")
    adapters = [read_adapter(folder, model) for folder in adapter_dirs]
    first = adapters[0]
    for adapter in adapters[1:]:
        for verb, mine, theirs in (("targets", adapter.targets, first.targets),
                                   ("saves (modules_to_save)", adapter.heads, first.heads)):
            if mine != theirs:
                name = min(set(mine) ^ set(theirs))
                has, lacks = (adapter, first) if name in mine else (first, adapter)
                raise ValueError(f"adapter {has.folder} {verb} module {name} and adapter {lacks.folder} does not: "
                                 "the members of one ensemble wrap the same modules")
        if adapter.rank != first.rank:
            raise ValueError(f"adapter {adapter.folder} has rank {adapter.rank} (module {adapter.targets[0]}), "
                             f"adapter {first.folder} rank {first.rank}: a LoRAEnsemble has one rank for every member")
    if first.lora_alpha == 0:
        raise ValueError(f"adapter {first.folder}: lora_alpha 0 (a no-op adapter) cannot be member 0, whose alpha the "
                         "ensemble keeps")
    dropouts = sorted({adapter.lora_dropout for adapter in adapters})
    if len(dropouts) > 1 and "lora_dropout" not in lora_ensemble_options:
        warnings.warn(f"the adapters' lora_dropout differ ({dropouts}); the ensemble uses adapter 0's, "
                      f"{first.lora_dropout} (it only matters in training; pass lora_dropout= to choose)",
                      stacklevel=2)
    options = {"lora_dropout": first.lora_dropout, **lora_ensemble_options}
    if adapter_dtype is not None:
        options["adapter_dtype"] = adapter_dtype
    targets = set(first.targets)

    def fill(ensemble: LoRAEnsemble) -> None:
        with torch.no_grad():
            for name, layer in ensemble.lora_layers().items():
                for n, adapter in enumerate(adapters):
                    lora_A, lora_B = adapter.lora[name]
                    ratio = adapter.scalings[name] / layer.scaling
                    layer.lora_A[n].copy_(lora_A)
                    layer.lora_B[n].copy_(lora_B if ratio == 1 else lora_B.double() * ratio)
            for name, head in ensemble.heads.items():
                for key, stacked in head.stacked_parameters().items():
                    for n, adapter in enumerate(adapters):
                        stacked[n].copy_(adapter.head_state[name][key])

    return _wrap(model, fill, num_members=len(adapters), rank=first.rank,
                 target_modules=lambda name, module: name in targets, alpha=first.lora_alpha,
                 use_rslora=first.use_rslora, head=first.heads or None, init="peft", allow_rank_above_size=True,
                 **options)


def save_peft_adapters(ensemble: LoRAEnsemble, directory: str | Path) -> list[str]:
    """Write member ``n`` as a peft LoRA adapter folder ``directory/member_<n>`` (what peft's
    ``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors``), loadable with
    ``PeftModel.from_pretrained`` on the same base with member ``n``'s outputs (needs only safetensors).

    Each folder's config: ``r`` = the rank, ``lora_alpha`` = the ensemble's alpha (the rank when it is
    None: scaling 1), its ``use_rslora`` and ``lora_dropout``, ``target_modules`` = the wrapped layers'
    full names, ``modules_to_save`` = the per-member heads; its weights: member ``n``'s ``lora_A [r, d]``
    and ``lora_B [k, r]`` of every wrapped layer and its copy of every head, in their dtype.

    Returns:
        The folders, in member order (created, or overwritten if they exist).

    Raises:
        ValueError: an ensemble whose ``nn.MultiheadAttention`` modules were converted (torchvision ViTs):
            its wrapped layers do not exist in the model peft would load the adapter into.
    """
    if any(isinstance(m, ExplicitMultiheadAttention) for m in ensemble.model.modules()):
        raise ValueError("save_peft_adapters: this ensemble's nn.MultiheadAttention modules were converted to "
                         "ExplicitMultiheadAttention, whose q_proj/k_proj/v_proj/out_proj the unconverted model peft "
                         "loads into does not have; use save_members")
    layers, heads = ensemble.lora_layers(), ensemble.heads
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(ensemble.model, "config", None), "_name_or_path", None) or None,
        "r": ensemble.rank,
        "lora_alpha": ensemble.alpha if ensemble.alpha is not None else ensemble.rank,
        "use_rslora": ensemble.use_rslora,
        "lora_dropout": ensemble.lora_dropout,
        "target_modules": list(layers),
        "modules_to_save": list(heads) or None,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    folders = []
    width = len(str(ensemble.num_members - 1))
    for n in range(ensemble.num_members):
        tensors = {}
        for name, layer in layers.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[n]
            tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[n]
        for name, head in heads.items():
            tensors.update({f"{PREFIX}{name}.{key}": stacked[n] for key, stacked in head.stacked_parameters().items()})
        folder = directory / f"member_{n:0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: t.detach().cpu().clone() for key, t in tensors.items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        folders.append(str(folder))
    return folders
