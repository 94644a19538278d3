"""``LoRAEnsemble``: N LoRA members on one frozen backbone, run together as one stacked batch.

The wrapped model computes, for member ``n`` and input ``x [B, ...]``::

    logits[n] = head[n]( backbone_n(x) )        backbone_n: every target linear W0 -> W0 + s B[n] A[n]

Every member runs in one forward pass: the input is replicated member-major along the batch
(``[N*B, ...]``, rows ``n*B:(n+1)*B`` are member ``n``), each target ``nn.Linear`` is swapped for a
:class:`~lora_ensemble.FusedLoRAEnsembleLinear` that shares its frozen weight, every other layer runs
unchanged on the stacked batch, and the classification head becomes an :class:`EnsembleHead` (one
linear per member). The output is ``[N, B, C]``.

Where the replication happens:

* default: at the model entry, every tensor argument whose leading dim is the batch size.
* ``replicate_at="<module name>"``: everything before that module runs once at batch ``B`` and the
  module's tensor inputs are replicated (e.g. ``"blocks"`` for timm ViTs, ``"encoder.layers"`` for
  torchvision's, ``"bert.encoder"`` for HF BERT classifiers).
* ``share_first_input=True``: the first LoRA layer that runs in a forward (and every LoRA layer later
  called on that very tensor, e.g. BERT's key and value after query) reads only member 0's rows with
  ``shared_input=True``, so its ``x @ W0^T`` is computed once. Nothing member-specific has run before
  that layer, so all member blocks of its input hold the same values and the result equals the
  default path (exactly so in eval mode; in training mode, stochastic layers before it (dropout)
  draw one mask shared by all members, as with ``replicate_at``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import metrics
from .attention import replace_multihead_attention
from .layout import replicate_members
from .modules import FusedLoRAEnsembleLinear

__all__ = ["EnsembleHead", "EnsemblePrediction", "LoRAEnsemble", "resolve_target_modules"]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]

# Default targets per model family, detected from module names: (suffix that identifies the family,
# patterns wrapped). Patterns match a module's dotted name, or its tail after a dot.
_FAMILY_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.qkv", ("attn.qkv", "attn.proj")),                             # timm VisionTransformer
    ("self_attention.q_proj", ("q_proj", "k_proj", "v_proj", "out_proj")),  # torchvision ViT (converted MHA)
    ("attention.self.query", ("query", "key", "value", "attention.output.dense")),  # HF BERT
)
_HEAD_NAMES: tuple[str, ...] = ("head", "heads.head", "classifier", "fc")


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def resolve_target_modules(model: nn.Module, target_modules: TargetSpec | None,
                           exclude: Sequence[str] = ()) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules of ``model`` that ``target_modules`` selects.

    Args:
        model: the backbone.
        target_modules: a name or glob pattern, a list of them (each matches a module's full dotted
            name or its tail after a dot: ``"qkv"`` matches ``"blocks.0.attn.qkv"``), a predicate
            ``(name, module) -> bool``, or None for the defaults of a known family (timm ViT,
            torchvision ViT, HF BERT).
        exclude: names never selected (the classification head).

    Raises:
        ValueError: a pattern that selects no ``nn.Linear`` (the message lists the candidates), or
            None for a model of no known family.
    """
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in exclude}
    if callable(target_modules):
        chosen = [name for name, m in linears.items() if target_modules(name, m)]
        if not chosen:
            raise ValueError(f"target_modules predicate selected no nn.Linear; candidates: {sorted(linears)}")
        return chosen
    if target_modules is None:
        for marker, patterns in _FAMILY_TARGETS:
            if any(_matches(name, marker) for name in linears):
                target_modules = patterns
                break
        else:
            raise ValueError("target_modules=None only knows timm/torchvision ViTs and HF BERT; pass names, "
                             f"patterns or a predicate. Candidates: {sorted(linears)}")
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name in linears if _matches(name, pattern)]
        if not hits:
            tails = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target_modules entry {pattern!r} matches no nn.Linear in "
                             f"{type(model).__name__}; candidate names: {sorted(linears)} (tails: {tails})")
        chosen += [name for name in hits if name not in chosen]
    return [name for name in linears if name in chosen]  # model order


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


class EnsembleHead(nn.Module):
    """One linear classifier per member, applied to member-major features.

    Input ``[N*B, ..., H]`` (rows ``n*B:(n+1)*B`` are member ``n``), output ``[N*B, ..., C]``;
    member ``n`` computes ``x @ weight[n]^T + bias[n]``.

    Attributes:
        weight: ``[N, C, H]``.
        bias: ``[N, C]`` or None.
    """

    def __init__(self, in_features: int, out_features: int, num_members: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_members = in_features, out_features, num_members
        self.weight = nn.Parameter(torch.empty(num_members, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_members, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each member initialised independently, as ``nn.Linear`` initialises itself."""
        with torch.no_grad():
            for n in range(self.num_members):
                nn.init.kaiming_uniform_(self.weight[n], a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(self.in_features)
                    nn.init.uniform_(self.bias[n], -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_members: int) -> EnsembleHead:
        """Every member starts as a copy of ``linear`` (its parameters are copied, not shared)."""
        w = linear.weight
        head = cls(linear.in_features, linear.out_features, num_members, bias=linear.bias is not None,
                   device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.copy_(w.detach().expand_as(head.weight))
            if linear.bias is not None:
                head.bias.copy_(linear.bias.detach().expand_as(head.bias))
        return head

    def forward(self, x: Tensor) -> Tensor:
        """``[N*B, ..., H]`` -> ``[N*B, ..., C]``."""
        if x.shape[0] % self.num_members != 0:
            raise ValueError(f"EnsembleHead: leading dim {x.shape[0]} (x shape {tuple(x.shape)}) is not "
                             f"divisible by num_members={self.num_members}")
        rows = x.reshape(self.num_members, -1, self.in_features)
        if self.bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), rows, self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.out_features)

    def merged_member(self, member: int) -> nn.Linear:
        """Member ``member`` as an independent ``nn.Linear``."""
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members}), got {member}")
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w[member])
            if self.bias is not None:
                linear.bias.copy_(self.bias[member])
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_members={self.num_members}, bias={self.bias is not None}")


@dataclass
class EnsemblePrediction:
    """What :meth:`LoRAEnsemble.predict` returns (``N`` members, ``B`` samples, ``C`` classes).

    Attributes:
        member_probs: ``[N, B, C]`` softmax of each member.
        mean_probs: ``[B, C]`` the ensemble's prediction, the mean of the member probabilities.
        variance: ``[B, C]`` per-class variance of the member probabilities (1/N, the paper's Eq. 4).
        predictive_entropy: ``[B]`` entropy of ``mean_probs`` (total uncertainty, nats).
        expected_entropy: ``[B]`` mean of the members' entropies (aleatoric part).
        mutual_information: ``[B]`` predictive minus expected entropy (epistemic part), >= 0.
    """

    member_probs: Tensor
    mean_probs: Tensor
    variance: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor) -> EnsemblePrediction:
        """The prediction of member logits ``[N, B, C]`` (softmax taken in fp32)."""
        member_probs = logits.float().softmax(dim=-1)
        mean = member_probs.mean(dim=0)
        return cls(
            member_probs=member_probs,
            mean_probs=mean,
            variance=metrics.member_variance(member_probs),
            predictive_entropy=metrics.entropy(mean),
            expected_entropy=metrics.expected_entropy(member_probs),
            mutual_information=metrics.mutual_information(member_probs),
        )


class _Replicator:
    """Forward pre-hook that replicates a module's batch-leading tensor inputs member-major."""

    def __init__(self, num_members: int) -> None:
        self.num_members = num_members
        self.batch: int | None = None

    def replicate(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        def rep(v: Any) -> Any:
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
                return replicate_members(v, self.num_members)
            return v
        return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if self.batch is None:
            raise RuntimeError("replicate_at module called outside LoRAEnsemble.forward")
        return self.replicate(args, kwargs)


class _FirstInputSharing:
    """Forward pre-hook on every LoRA layer: the first one to run in a forward, and any later one
    called on the very same tensor, reads member 0's rows with ``shared_input=True``."""

    def __init__(self, num_members: int) -> None:
        self.num_members = num_members
        self.active = False
        self.source: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not self.active or kwargs.get("shared_input") is not None:
            return None
        x = args[0]
        if self.source is None:
            self.source = x
        elif x is not self.source:
            return None
        first_member = x.reshape(self.num_members, x.shape[0] // self.num_members, *x.shape[1:])[0]
        return (first_member, *args[1:]), {**kwargs, "shared_input": True}


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


class LoRAEnsemble(nn.Module):
    """``num_members`` LoRA members of one frozen ``model``, evaluated in a single stacked pass.

    ``model`` is modified in place and kept as ``self.model``: every ``nn.MultiheadAttention`` is
    swapped for an equivalent :class:`~lora_ensemble.attention.ExplicitMultiheadAttention`, each
    target ``nn.Linear`` for a :class:`~lora_ensemble.FusedLoRAEnsembleLinear` sharing its weight
    and bias, and the head for an :class:`EnsembleHead`. All original parameters are frozen; the
    trainable ones are the LoRA factors and the heads.

    Args:
        model: the backbone; its forward must take the batch on dim 0 of its tensor inputs.
        num_members: ``N``.
        rank: LoRA rank ``r``.
        target_modules: see :func:`resolve_target_modules` (None: the family's attention projections).
        alpha: LoRA ``alpha`` (scaling ``alpha / r``); None gives scaling 1, as the paper's code.
        head: dotted name of the ``nn.Linear`` classifier to make per-member; ``"auto"`` tries
            ``head``, ``heads.head``, ``classifier``, ``fc``; None keeps the model's output as is.
        num_classes: fresh per-member heads with this many classes (independently initialised);
            None copies the model's head into every member.
        init_gain: Xavier gain of ``lora_A`` (10, as the paper).
        backend: the fused op's backend.
        replicate_at: dotted name of the module at whose input the batch is replicated (None: at
            the model entry). Everything before it runs once, at batch ``B``.
        share_first_input: run the first LoRA layer(s) on member 0's rows with ``shared_input``
            (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        num_members: int,
        rank: int,
        target_modules: TargetSpec | None = None,
        alpha: float | None = None,
        head: str | None = "auto",
        num_classes: int | None = None,
        init_gain: float = 10.0,
        backend: str = "auto",
        replicate_at: str | None = None,
        share_first_input: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be a positive int, got {num_members!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.num_members, self.rank, self.alpha = num_members, rank, alpha
        self.init_gain, self.backend = init_gain, backend
        model.requires_grad_(False)
        replace_multihead_attention(model)

        self.head_name = self._find_head(model, head)
        if self.head_name is not None:
            original = model.get_submodule(self.head_name)
            if num_classes is None:
                new_head = EnsembleHead.from_linear(original, num_members)
            else:
                w = original.weight
                new_head = EnsembleHead(original.in_features, num_classes, num_members,
                                        bias=original.bias is not None, device=w.device, dtype=w.dtype)
            _set_submodule(model, self.head_name, new_head)
        elif num_classes is not None:
            raise ValueError("num_classes needs a head to replace; head=None keeps the model's output")

        self.target_names = resolve_target_modules(model, target_modules)
        for name in self.target_names:
            layer = FusedLoRAEnsembleLinear.from_linear(model.get_submodule(name), num_members, rank,
                                                        alpha=alpha, backend=backend, init_gain=init_gain)
            _set_submodule(model, name, layer)
        self.model = model

        self.replicate_at = replicate_at
        self.share_first_input = share_first_input
        self._replicator = _Replicator(num_members)
        self._sharing = _FirstInputSharing(num_members)
        self._hook_handles: list[RemovableHandle] = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        if self.replicate_at is not None:
            trunk = self.model.get_submodule(self.replicate_at)
            self._hook_handles.append(trunk.register_forward_pre_hook(self._replicator, with_kwargs=True))
        if self.share_first_input:
            for layer in self.lora_layers().values():
                self._hook_handles.append(layer.register_forward_pre_hook(self._sharing, with_kwargs=True))

    @contextmanager
    def hooks_removed(self) -> Iterator[None]:
        """Within this context ``self.model`` carries none of the ensemble's forward pre-hooks
        (what :func:`lora_ensemble.io.export_member` copies the model under)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        try:
            yield
        finally:
            self._install_hooks()

    @staticmethod
    def _find_head(model: nn.Module, head: str | None) -> str | None:
        if head is None:
            return None
        modules = dict(model.named_modules())
        if head == "auto":
            found = [n for n in _HEAD_NAMES if isinstance(modules.get(n), nn.Linear)]
            if not found:
                raise ValueError(f"head='auto' found none of {_HEAD_NAMES} as an nn.Linear in "
                                 f"{type(model).__name__}; pass head=<name> or head=None")
            return found[0]
        if not isinstance(modules.get(head), nn.Linear):
            linears = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))
            raise ValueError(f"head {head!r} is not an nn.Linear of {type(model).__name__}; candidates: {linears}")
        return head

    def lora_layers(self) -> dict[str, FusedLoRAEnsembleLinear]:
        """The wrapped layers by their dotted name in ``self.model``."""
        return {name: self.model.get_submodule(name) for name in self.target_names}

    @property
    def head(self) -> EnsembleHead | None:
        """The per-member classification head, or None."""
        return self.model.get_submodule(self.head_name) if self.head_name is not None else None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The model's inputs (batch ``B`` on dim 0) -> every member's logits ``[N, B, ...]``."""
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() >= 1), None)
        if first is None:
            raise ValueError("LoRAEnsemble.forward needs at least one tensor input with a batch dim")
        batch = first.shape[0]
        self._replicator.batch = batch
        if self.replicate_at is None:
            args, kwargs = self._replicator.replicate(args, kwargs)
        self._sharing.active = self.share_first_input
        try:
            out = _logits_of(self.model(*args, **kwargs))
        finally:
            self._replicator.batch = None
            self._sharing.active, self._sharing.source = False, None
        return out.reshape(self.num_members, batch, *out.shape[1:])

    @torch.no_grad()
    def predict(self, *args: Any, **kwargs: Any) -> EnsemblePrediction:
        """Ensemble prediction and its uncertainty for classification logits ``[N, B, C]``
        (gradients off; the module's train/eval mode is left as it is)."""
        return EnsemblePrediction.from_logits(self(*args, **kwargs))

    def select_members_(self, members: slice) -> LoRAEnsemble:
        """Keep only ``members``, in place: every wrapped layer's ``lora_A [N, r, d]`` and
        ``lora_B [N, k, r]`` and the head's ``weight [N, C, H]``, ``bias [N, C]`` are sliced along
        dim 0 into new Parameters, and every member count becomes the block's size. Build optimizers
        after this call. Returns ``self``.

        Raises:
            ValueError: a strided slice, or one that keeps no member (slices clip to ``range(N)`` as
                Python's do); the ensemble is left unchanged.
        """
        kept = range(self.num_members)[members]
        if len(kept) == 0 or members.step not in (None, 1):
            raise ValueError(f"members must be a non-empty contiguous slice of range({self.num_members}), "
                             f"got {members}")

        def keep(param: Tensor) -> nn.Parameter:
            return nn.Parameter(param.detach()[members].clone(), requires_grad=param.requires_grad)

        for module in self.modules():
            if isinstance(module, FusedLoRAEnsembleLinear):
                module.lora_A, module.lora_B = keep(module.lora_A), keep(module.lora_B)
                module.num_members = len(kept)
            elif isinstance(module, EnsembleHead):
                module.weight = keep(module.weight)
                if module.bias is not None:
                    module.bias = keep(module.bias)
                module.num_members = len(kept)
        # The member count lives on the ensemble and on its two forward pre-hooks.
        self.num_members = self._replicator.num_members = self._sharing.num_members = len(kept)
        return self

    def extra_repr(self) -> str:
        return (f"num_members={self.num_members}, rank={self.rank}, alpha={self.alpha}, "
                f"targets={len(self.target_names)}, head={self.head_name!r}, replicate_at={self.replicate_at!r}, "
                f"share_first_input={self.share_first_input}")
