"""``LoRAEnsemble``: N LoRA members on one frozen backbone, run together as one stacked batch.

The wrapped model computes, for member ``n`` and input ``x [B, ...]``::

    logits[n] = head[n]( backbone_n(x) )        backbone_n: every target layer W0 -> W0 + s B[n] A[n]

Every member runs in one forward pass: the input is replicated member-major along the batch
(``[N*B, ...]``, rows ``n*B:(n+1)*B`` are member ``n``), each target ``nn.Linear`` (or HF ``Conv1D``)
is swapped for a :class:`~lora_ensemble.FusedLoRAEnsembleLinear` that shares its frozen weight,
every other layer runs unchanged on the stacked batch, and the classification heads become
per-member (:class:`~lora_ensemble.heads.EnsembleHead` for an ``nn.Linear``,
:class:`~lora_ensemble.heads.PerMemberModule` for a head of several layers). The output is
``[N, B, ...]``. A language model's ``lm_head`` stays one shared frozen layer; :meth:`LoRAEnsemble.generate`
is HF ``generate`` of every member (or of the ensemble) in one stacked batch with one KV cache,
:meth:`LoRAEnsemble.predict` with ``answer_token_ids`` scores multiple-choice answers at each sequence's
last token, :meth:`LoRAEnsemble.sequence_uncertainty` scores generated text with every member (the
decoding code is :mod:`lora_ensemble.generation`).

Where the replication happens:

* default: at the model entry, every tensor argument whose leading dim is the batch size (except
  ``cache_position`` and ``logits_to_keep``, which index positions).
* ``replicate_at="<module name>"``: everything before that module runs once at batch ``B`` and the
  module's tensor inputs are replicated (e.g. ``"blocks"`` for timm ViTs, ``"encoder.layers"`` for
  torchvision's, ``"bert.encoder"`` for HF BERT classifiers).
* ``share_first_input=True``: the first LoRA layer that runs in a forward (and every LoRA layer later
  called on that very tensor, e.g. BERT's key and value after query) reads only member 0's rows with
  ``shared_input=True``, so its ``x @ W0^T`` is computed once. Nothing member-specific has run before
  that layer, so all member blocks of its input hold the same values and the result equals the
  default path (exactly so in eval mode; in training mode, stochastic layers before it (dropout)
  draw one mask shared by all members, as with ``replicate_at``).

Calls are re-entrant: a forward, :meth:`LoRAEnsemble.predict` or :meth:`LoRAEnsemble.generate` changes no
module or parameter. What a call needs while it runs (the batch size its hooks replicate, the first LoRA
layer's input, a member chunk's selection) is kept per thread (:mod:`lora_ensemble.calls`) and put back
when it returns or raises, so threads may call one ensemble at once. ``predict`` and ``generate`` put a
model that is in training mode in eval mode for the call (a module state other threads see); a model
already in eval mode is left alone.

Calling ``ensemble.model`` (or ``ensemble.model.generate``) directly bypasses the replication: the
model then expects the stacked batch ``[N*B, ...]``. A batch whose size is not a multiple of ``N``
is refused with a ``ValueError``; one that happens to be a multiple of ``N`` cannot be told apart
from a stacked batch and runs sample ``n*B + b`` through member ``n``. Call the ensemble
(``ensemble(...)``, ``predict``, ``generate``) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import generation, metrics
from .attention import replace_multihead_attention
from .calls import MEMBER_SELECTION, ThreadLocalSlot
from .heads import EnsembleHead, PerMemberModule
from .layout import replicate_members
from .modules import LoRAEnsembleLayer, check_lora_options, wrap_linear
from .targets import TargetSpec, find_heads, has_lm_head, resolve_target_modules

__all__ = ["EnsembleHead", "EnsemblePrediction", "LoRAEnsemble", "PerMemberModule", "resolve_target_modules"]

# Keyword inputs that index positions, not samples: never replicated, never taken as the batch.
_NOT_BATCHED = frozenset({"cache_position", "logits_to_keep"})
# Keyword inputs that carry the batch, when a call to the wrapped model is checked for replication.
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values")
_PER_MEMBER_TYPES = (LoRAEnsembleLayer, EnsembleHead, PerMemberModule)


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


@dataclass
class _Call:
    """One call of the wrapped model by the ensemble. It lives in the ensemble's per-thread slot
    (:class:`~lora_ensemble.calls.ThreadLocalSlot`) while the call runs, never on the modules.

    Attributes:
        count: the members this call runs (a member chunk's size, or ``N``).
        batch: ``B`` when the inputs are one batch to replicate member-major (at the entry or at
            ``replicate_at``), None when they are already stacked ``[count*B, ...]``.
        share_first_input: whether the first LoRA layer reads member 0's rows (``share_first_input``).
        shared_source: the input of the first LoRA layer that ran in this call, once one has.
        replicate_each_entry: :meth:`LoRAEnsemble.external_calls` with ``replicate=True``: each call of
            the wrapped model sets ``batch`` from its own inputs and is replicated.
        transform_output: :meth:`LoRAEnsemble.external_calls`' function of the wrapped model's output.
    """

    count: int
    batch: int | None
    share_first_input: bool
    shared_source: Tensor | None = None
    replicate_each_entry: bool = False
    transform_output: Callable[[Any], Any] | None = None

    def replicate(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """``args`` / ``kwargs`` with every tensor whose leading dim is ``batch`` replicated ``count``
        times member-major (none when ``batch`` is None)."""
        if self.batch is None:
            return args, kwargs

        def rep(v: Any) -> Any:
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
                return replicate_members(v, self.count)
            return v
        return (tuple(rep(a) for a in args),
                {k: v if k in _NOT_BATCHED else rep(v) for k, v in kwargs.items()})


class _Replicator:
    """Forward pre-hook that replicates a module's batch-leading tensor inputs member-major, and the
    check on the wrapped model's entry that it is called through the ensemble or on a stacked batch.
    Both read the call in progress on this thread from ``calls``."""

    def __init__(self, num_members: int, calls: ThreadLocalSlot) -> None:
        self.num_members = num_members  # for the direct-call check
        self.calls = calls

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        call = self.calls.value
        if call is None:
            raise RuntimeError("replicate_at module called outside LoRAEnsemble.forward")
        return call.replicate(args, kwargs)

    def check_direct_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook on the wrapped model: a direct call must bring a stacked batch."""
        if self.calls.value is not None:
            return
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            first = next((kwargs[k] for k in _BATCH_INPUTS if isinstance(kwargs.get(k), Tensor)), None)
        if first is not None and first.dim() >= 1 and first.shape[0] % self.num_members != 0:
            raise ValueError(
                f"{type(module).__name__} of a LoRAEnsemble was called directly with a batch of {first.shape[0]} "
                f"(input shape {tuple(first.shape)}), not a multiple of num_members={self.num_members}: the wrapped "
                "model expects the member-stacked batch [N*B, ...]. Call the ensemble instead (ens(...), "
                "ens.predict(...), ens.generate(...)), or stack the batch with replicate_members(x, N). A batch that "
                "happens to be a multiple of N is not detected: its rows n*B:(n+1)*B run through member n.")


class _FirstInputSharing:
    """Forward pre-hook on every LoRA layer: in a call with ``share_first_input``, the first one to run,
    and any later one called on the very same tensor, reads member 0's rows with ``shared_input=True``."""

    def __init__(self, calls: ThreadLocalSlot) -> None:
        self.calls = calls

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        call = self.calls.value
        if call is None or not call.share_first_input or kwargs.get("shared_input") is not None:
            return None
        x = args[0]
        if call.shared_source is None:
            call.shared_source = x
        elif x is not call.shared_source:
            return None
        first_member = x.reshape(call.count, x.shape[0] // call.count, *x.shape[1:])[0]
        return (first_member, *args[1:]), {**kwargs, "shared_input": True}


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    values = (*args, *(v for k, v in kwargs.items() if k not in _NOT_BATCHED))
    first = next((v for v in values if isinstance(v, Tensor) and v.dim() >= 1), None)
    if first is None:
        raise ValueError("LoRAEnsemble needs at least one tensor input with a batch dim")
    return first.shape[0]


def _set_by_name(root: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, value)


@contextmanager
def _undone_on_error(model: nn.Module) -> Iterator[None]:
    """On an exception, put back every submodule ``model`` had and every parameter's ``requires_grad``."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for parent, name, child in children:
            setattr(parent, name, child)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model that already holds LoRA-Ensemble layers or per-member heads: wrapping it again would
    freeze the first ensemble's factors and heads (``requires_grad_(False)``) and run them inside the new one."""
    wrapped = [(name or type(model).__name__, type(m).__name__) for name, m in model.named_modules()
               if isinstance(m, _PER_MEMBER_TYPES)]
    if wrapped:
        shown = ", ".join(f"{name} ({kind})" for name, kind in wrapped[:3]) + (" ..." if len(wrapped) > 3 else "")
        raise ValueError(f"{type(model).__name__} is already wrapped: it holds {len(wrapped)} LoRA-Ensemble layers "
                         f"or per-member heads ({shown}). Wrap the unwrapped base model (a LoRAEnsemble's model "
                         "cannot be wrapped again), or pass more target_modules to one LoRAEnsemble")


class LoRAEnsemble(nn.Module):
    """``num_members`` LoRA members of one frozen ``model``, evaluated in a single stacked pass.

    ``model`` is modified in place and kept as ``self.model``: every ``nn.MultiheadAttention`` is
    swapped for an equivalent :class:`~lora_ensemble.attention.ExplicitMultiheadAttention`, each
    target ``nn.Linear`` / HF ``Conv1D`` for a :class:`~lora_ensemble.FusedLoRAEnsembleLinear` sharing
    its weight and bias (a quantized or parametrized ``nn.Linear``, whose weight the kernels cannot
    read, for a :class:`~lora_ensemble.LoRAEnsembleOverBase` around it), and each head for a per-member
    head. All original parameters are frozen; the trainable ones are the LoRA factors and the heads. If
    wrapping fails (an unknown target, a bad option), ``model`` is left as it was.

    ``LoRAEnsemble(model, N, r)`` with nothing else wraps the attention projections of timm,
    torchvision and HF ViTs, HF DeiT, AST, BERT, RoBERTa, Llama, Mistral, Qwen2, Gemma, Phi-3 and GPT-2
    (see :mod:`lora_ensemble.targets`).

    Args:
        model: the backbone; its forward must take the batch on dim 0 of its tensor inputs.
        num_members: ``N``.
        rank: LoRA rank ``r``, at most ``min(in_features, out_features)`` of every target layer (a
            ``ValueError`` naming the layer otherwise) unless ``allow_rank_above_size``.
        target_modules: see :func:`~lora_ensemble.targets.resolve_target_modules` (None: the family's
            attention projections).
        alpha: LoRA ``alpha`` (scaling ``alpha / r``); None gives scaling 1, as the paper's code.
        head: ``"auto"`` (see :mod:`lora_ensemble.targets`: none for a language model, whose
            ``lm_head`` stays shared and frozen; an HF model's task heads; else the first ``nn.Linear``
            of ``head``, ``heads.head``, ``classifier``, ``fc``), a dotted module name or a list of
            them, or None (the model's output as is). An ``nn.Linear`` head becomes an
            :class:`EnsembleHead`; any other module a :class:`PerMemberModule` (copied whole per member).
        num_classes: fresh per-member heads with this many classes, independently initialised (for a
            module head: its last ``nn.Linear`` is replaced); None copies the model's heads into every
            member (then the members' heads start equal).
        init_gain: Xavier gain of ``lora_A`` with ``init="paper"`` (10, as the paper).
        backend: the fused op's backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (another name
            is a ``ValueError`` here; one this machine cannot run fails at the first call, saying why).
        replicate_at: dotted name of the module at whose input the batch is replicated (None: at
            the model entry). Everything before it runs once, at batch ``B``.
        share_first_input: run the first LoRA layer(s) on member 0's rows with ``shared_input``
            (see the module docstring).
        init: ``"paper"`` (``lora_A`` Xavier-uniform, gain ``init_gain``: the LoRA-Ensemble paper's, for
            vision and encoder models) or ``"peft"`` (Kaiming-uniform, ``a=sqrt(5)``: peft's, which the
            LLM LoRA-ensemble work uses). None: ``"peft"`` for a language model (``has_lm_head``),
            ``"paper"`` otherwise. ``lora_B`` starts at zero either way.
        use_rslora: rsLoRA scaling ``alpha / sqrt(r)`` (needs ``alpha``).
        lora_dropout: dropout on the LoRA path's input in training mode (peft's ``lora_dropout``;
            see :class:`~lora_ensemble.FusedLoRAEnsembleLinear` for its cost).
        adapter_dtype: the dtype of every LoRA factor (and of its gradient and optimizer state); None:
            each base layer's dtype (float32 over a quantized base). fp32 factors on a bf16 model are
            peft's default: the ops cast them to the activations' dtype per call (a pass over the
            factors only) and accumulate in fp32. The heads keep the model's dtype.
        member_chunk_size: run the members ``k`` at a time (forward, :meth:`forward_hf`,
            :meth:`predict`, :meth:`generate`): the same results as all at once, with the activations of
            ``k*B`` rows instead of ``N*B`` at a time. None: all at once. Also settable later as the
            attribute.
        allow_rank_above_size: accept a ``rank`` above a target's ``min(in_features, out_features)``
            (what :func:`~lora_ensemble.io.load_peft_adapters` and :func:`~lora_ensemble.io.load_members`
            pass: peft saves such adapters and loading one must reproduce it).

    Raises:
        ValueError: ``model`` already holds LoRA-Ensemble layers or per-member heads (a wrapped model, or
            the model of one: wrapping it again would freeze the first ensemble), or a bad option.
    """

    def __init__(
        self,
        model: nn.Module,
        num_members: int,
        rank: int,
        target_modules: TargetSpec | None = None,
        alpha: float | None = None,
        head: str | Sequence[str] | None = "auto",
        num_classes: int | None = None,
        init_gain: float = 10.0,
        backend: str = "auto",
        replicate_at: str | None = None,
        share_first_input: bool = False,
        init: str | None = None,
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        member_chunk_size: int | None = None,
        adapter_dtype: torch.dtype | None = None,
        allow_rank_above_size: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be a positive int, got {num_members!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if member_chunk_size is not None and (not isinstance(member_chunk_size, int) or member_chunk_size < 1):
            raise ValueError(f"member_chunk_size must be a positive int or None, got {member_chunk_size!r}")
        init = init if init is not None else ("peft" if has_lm_head(model) else "paper")
        check_lora_options(init, alpha, use_rslora, lora_dropout, adapter_dtype, backend)
        _check_not_wrapped(model)
        self.num_members, self.rank, self.alpha = num_members, rank, alpha
        self.adapter_dtype = adapter_dtype
        self.init, self.init_gain, self.use_rslora, self.lora_dropout = init, init_gain, use_rslora, lora_dropout
        self.backend, self.num_classes, self.member_chunk_size = backend, num_classes, member_chunk_size

        if replicate_at is not None:
            try:
                model.get_submodule(replicate_at)
            except AttributeError as exc:
                raise ValueError(f"replicate_at={replicate_at!r} names no submodule of {type(model).__name__}") from exc
        with _undone_on_error(model):
            model.requires_grad_(False)
            replace_multihead_attention(model)
            self.head_names = find_heads(model, head)
            if num_classes is not None and not self.head_names:
                raise ValueError("num_classes needs a head to replace; head=None (or a language model) keeps "
                                 "the model's output as is")
            for name in self.head_names:
                _set_by_name(model, name, self._per_member_head(model.get_submodule(name)))
            self.target_names = resolve_target_modules(model, target_modules)
            for name in self.target_names:
                try:
                    layer = wrap_linear(
                        model.get_submodule(name), num_members, rank, alpha=alpha, backend=backend,
                        init_gain=init_gain, init=init, use_rslora=use_rslora, lora_dropout=lora_dropout,
                        adapter_dtype=adapter_dtype, allow_rank_above_size=allow_rank_above_size)
                except ValueError as exc:
                    raise ValueError(f"target {name}: {exc}") from exc
                _set_by_name(model, name, layer)
            model.train(model.training)  # the new layers and heads take the model's mode (eval stays eval)
        self.model = model

        self.replicate_at = replicate_at
        self.share_first_input = share_first_input
        self._calls = ThreadLocalSlot()  # the _Call in progress on each thread
        self._replicator = _Replicator(num_members, self._calls)
        self._sharing = _FirstInputSharing(self._calls)
        self._hook_handles: list[RemovableHandle] = []
        self._install_hooks()

    def _per_member_head(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            if self.num_classes is None:
                return EnsembleHead.from_linear(module, self.num_members)
            w = module.weight
            return EnsembleHead(module.in_features, self.num_classes, self.num_members,
                                bias=module.bias is not None, device=w.device, dtype=w.dtype)
        return PerMemberModule.from_module(module, self.num_members, self.num_classes)

    def _install_hooks(self) -> None:
        self._hook_handles.append(self.model.register_forward_pre_hook(self._replicator.check_direct_call,
                                                                       with_kwargs=True))
        # Appended, not prepended: torch 2.11's dynamo guards pre-hooks by their position in the dict and
        # misplaces a prepended one.
        self._hook_handles.append(self.model.register_forward_pre_hook(self._external_entry, with_kwargs=True))
        self._hook_handles.append(self.model.register_forward_hook(self._external_exit, with_kwargs=True))
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
        self._remove_hooks()
        try:
            yield
        finally:
            self._install_hooks()

    def _remove_hooks(self) -> None:
        """Take the ensemble's forward pre-hooks off ``self.model`` for good (what a loader does when it
        gives a model back unwrapped after an error); the ensemble no longer replicates its inputs."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def lora_layers(self) -> dict[str, LoRAEnsembleLayer]:
        """The wrapped layers by their dotted name in ``self.model``."""
        return {name: self.model.get_submodule(name) for name in self.target_names}

    @property
    def heads(self) -> dict[str, EnsembleHead | PerMemberModule]:
        """The per-member heads by their dotted name in ``self.model`` (empty for a language model)."""
        return {name: self.model.get_submodule(name) for name in self.head_names}

    @property
    def head_name(self) -> str | None:
        """The name of the first (usually only) per-member head, or None."""
        return self.head_names[0] if self.head_names else None

    @property
    def head(self) -> EnsembleHead | PerMemberModule | None:
        """The first (usually only) per-member head, or None."""
        return self.model.get_submodule(self.head_name) if self.head_name is not None else None

    def member_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that holds one slice per member along dim 0 (``[N, ...]``), by its dotted
        name in ``self.model``: each wrapped layer's ``lora_A`` / ``lora_B`` and every head parameter."""
        params: dict[str, nn.Parameter] = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, LoRAEnsembleLayer):
                params[f"{prefix}.lora_A"], params[f"{prefix}.lora_B"] = module.lora_A, module.lora_B
            elif isinstance(module, (EnsembleHead, PerMemberModule)):
                params.update(module.named_parameters(prefix))
        return params

    def _chunks(self) -> list[slice]:
        size = self.member_chunk_size or self.num_members
        return [slice(start, min(start + size, self.num_members)) for start in range(0, self.num_members, size)]

    def _call(self, members: slice, batch: int | None, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``self.model`` on the members ``members`` only. ``batch``: ``B`` when the inputs are one batch
        to replicate (at the entry or at ``replicate_at``), None when they are stacked ``[k*B, ...]``.

        The call's state (a :class:`_Call`, and the member selection of a chunk that the LoRA layers and
        heads read, :data:`~lora_ensemble.calls.MEMBER_SELECTION`) is kept per thread and put back as it
        was on return or error: no module or parameter changes, so threads may call one ensemble at once."""
        count = len(range(self.num_members)[members])
        call = _Call(count, batch, self.share_first_input and batch is not None)
        outer_call, outer_members = self._calls.value, MEMBER_SELECTION.value
        self._calls.value = call
        MEMBER_SELECTION.value = members if count < self.num_members else None
        try:
            if self.replicate_at is None:
                args, kwargs = call.replicate(args, kwargs)
            return self.model(*args, **kwargs)
        finally:
            MEMBER_SELECTION.value, self._calls.value = outer_members, outer_call

    def _run(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, list[tuple[int, Any]]]:
        """The batch size and every member chunk's (member count, raw model output)."""
        batch = _batch_size(args, kwargs)
        return batch, [(len(range(self.num_members)[c]), self._call(c, batch, args, kwargs)) for c in self._chunks()]

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The model's inputs (batch ``B`` on dim 0) -> every member's logits ``[N, B, ...]``
        (a causal LM: ``[N, B, T, V]``). The rest of an HF output: :meth:`forward_hf`."""
        batch, outs = self._run(args, kwargs)
        return torch.cat([_logits_of(out).reshape(count, batch, *_logits_of(out).shape[1:]) for count, out in outs])

    def forward_hf(self, *args: Any, **kwargs: Any) -> Any:
        """The HF output of the stacked pass, with ``logits`` as ``[N, B, ...]``.

        ``loss`` (when ``labels`` are given) is HF's loss over the stacked batch, which with the labels
        replicated is the mean over members of each member's loss. The KV cache (``cache``; before
        transformers 5.2x ``past_key_values``), ``hidden_states`` and the other fields are HF's for the
        stacked batch ``[N*B, ...]`` (member-major); to continue decoding from that cache pass ``ens.model``
        stacked inputs (:func:`lora_ensemble.generation.decode_one_token`), or use :meth:`generate`. With
        ``member_chunk_size`` set below ``N`` only ``loss`` and ``logits`` are returned (the other fields
        exist per chunk, not for the whole ensemble).

        Raises:
            TypeError: the model does not return an HF ``ModelOutput`` with ``logits``.
        """
        batch, outs = self._run(args, kwargs)
        first = outs[0][1]
        if not (hasattr(first, "keys") and "logits" in first.keys()):
            raise TypeError(f"forward_hf needs a model that returns an HF ModelOutput with logits, got "
                            f"{type(first).__name__}; use ens(...) for the logits")
        logits = torch.cat([out.logits.reshape(count, batch, *out.logits.shape[1:]) for count, out in outs])
        if len(outs) == 1:
            first["logits"] = logits
            return first
        fields: dict[str, Any] = {"logits": logits}
        if all(getattr(out, "loss", None) is not None for _, out in outs):
            fields["loss"] = sum(out.loss * count for count, out in outs) / self.num_members
        return type(first)(**fields)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the call, the modes put back after. A model already in eval mode (a server's) is
        left alone: no write, so calls from several threads do not race on the modes."""
        modes = [(m, m.training) for m in self.modules()]
        if not any(training for _, training in modes):
            yield
            return
        self.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    @contextmanager
    def external_calls(self, replicate: bool, transform_output: Callable[[Any], Any] | None = None) -> Iterator[None]:
        """Within this context ``self.model`` is called by a loop outside the ensemble (HF ``generate``,
        the decode steps of :mod:`lora_ensemble.generation`), one call at a time, on this thread.

        ``replicate=False``: every call brings the member-stacked batch ``[N*R, ...]`` (rows
        ``n*R:(n+1)*R`` are member ``n``'s). ``replicate=True``: every call brings ``R`` rows (the batch
        of its ``input_ids``, else ``inputs_embeds``, else its first tensor), replicated member-major at
        the model's entry, or at ``replicate_at``, as :meth:`forward` does; ``transform_output`` then
        receives the model's output for the ``N*R`` rows and returns what the caller gets. Every member
        runs in each call (``member_chunk_size`` does not apply).

        Like :meth:`forward`, the context keeps its state in this thread's call slot and the hooks
        installed at wrapping read it there: nothing on the modules changes, so other threads may call
        the ensemble meanwhile.
        """
        call = _Call(self.num_members, None, False, replicate_each_entry=replicate,
                     transform_output=transform_output)
        outer_call, outer_members = self._calls.value, MEMBER_SELECTION.value
        self._calls.value, MEMBER_SELECTION.value = call, None
        try:
            yield
        finally:
            MEMBER_SELECTION.value, self._calls.value = outer_members, outer_call

    def _external_entry(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Pre-hook on the wrapped model: in :meth:`external_calls` with ``replicate=True``, each call's
        batch is replicated member-major (at the entry, or later at ``replicate_at``), and a call with
        ``share_first_input`` starts its sharing anew."""
        call = self._calls.value
        if call is None or not call.replicate_each_entry:
            return None
        first = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if isinstance(kwargs.get(k), Tensor)), None)
        call.batch = first.shape[0] if first is not None else _batch_size(args, kwargs)
        call.share_first_input, call.shared_source = self.share_first_input, None
        return call.replicate(args, kwargs) if self.replicate_at is None else (args, kwargs)

    def _external_exit(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Forward hook on the wrapped model: in :meth:`external_calls` with ``transform_output``, what
        the caller gets for the model's output."""
        call = self._calls.value
        if call is None or call.transform_output is None:
            return None
        return call.transform_output(output)

    @torch.no_grad()
    def predict(self, *args: Any, answer_token_ids: Sequence[int] | Tensor | None = None,
                **kwargs: Any) -> EnsemblePrediction:
        """Ensemble prediction and its uncertainty, in eval mode (the previous train/eval mode of
        every submodule is restored) without gradients.

        Without ``answer_token_ids``: the model's inputs -> classification logits ``[N, B, C]``.

        With ``answer_token_ids`` (a causal LM, multiple-choice QA as in Balabanov & Linander):
        ``predict(input_ids [B, T], attention_mask=mask, answer_token_ids=[id_A, id_B, ...])`` takes each
        member's next-token logits at each sequence's last attended position (left or right padding),
        keeps the answer tokens' logits ``[N, B, A]`` and softmaxes over them: the prediction is over
        the answers, renormalised (:func:`lora_ensemble.generation.answer_logits`). Position ids follow
        the mask (as HF ``generate`` computes them) unless given; only the needed positions reach
        ``lm_head`` (``logits_to_keep``) when the model takes that argument.

        Raises:
            ValueError: malformed ``input_ids`` / ``attention_mask``, an empty ``answer_token_ids`` or
                one outside the vocabulary.
        """
        with self._eval_mode():
            if answer_token_ids is None:
                return EnsemblePrediction.from_logits(self(*args, **kwargs))
            if len(args) > 1 or (args and "input_ids" in kwargs):
                raise TypeError("predict with answer_token_ids takes input_ids (positional or keyword) and every "
                                "other model input by keyword")
            input_ids = args[0] if args else kwargs.pop("input_ids", None)
            return EnsemblePrediction.from_logits(generation.answer_logits(self, input_ids, answer_token_ids, kwargs))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, ensemble: bool | str = False,
                 **generate_options: Any) -> Any:
        """HF ``generate`` of every member, or of the ensemble, in one stacked batch with one KV cache (in
        eval mode, restored afterwards; no gradients). See :mod:`lora_ensemble.generation`.

        ``ensemble=False``: each member decodes its own continuations: HF ``generate`` of the wrapped model
        on the member-stacked prompts, reshaped member-first: ``[N, B*k, T + new]`` (``k`` =
        ``num_return_sequences``), member ``n``'s rows being what HF ``generate`` gives member ``n`` alone
        (greedy, sampling, beam search, ``num_return_sequences``, processors, stopping criteria, ...).
        With ``return_dict_in_generate=True``: HF's output class, every per-row field ``[N, rows per
        member, ...]`` (the cache stays stacked). Logits processors, stopping criteria and streamers see
        the stacked rows ``[N*B*k, ...]``; ``prefix_allowed_tokens_fn`` gets the prompt's index in ``B``.

        ``ensemble="mean_probs"`` (or True) / ``"mean_logprobs"``: one decoding of the ensemble,
        ``[B*k, T + new]`` (HF's shapes for one model), HF generate of a model whose next-token logits are
        the ensemble's log-probabilities under that rule; every HF option acts on them, and
        ``output_scores`` / ``output_logits`` give the ensemble's scores.

        ``generate_options`` are HF ``generate``'s (``max_new_tokens``, ``do_sample``, ``num_beams``,
        ``num_return_sequences``, ``eos_token_id``, ``logits_processor``, ``stopping_criteria``,
        ``streamer``, ``return_dict_in_generate``, ``output_scores``, ...), unset ones from
        ``self.model.generation_config`` as HF does. Sampling draws from the global generator (seed it with
        ``torch.manual_seed``).

        Raises:
            TypeError: a model that cannot generate; ``generator`` (HF samples from the global generator);
                with ensemble decoding, assisted decoding or a cache of the caller's (named in the message).
            ValueError: malformed or right-padded ``input_ids`` / ``attention_mask``, an unknown rule, or
                ``member_chunk_size`` below ``N`` (decoding runs all members in one batch).
        """
        rule = None if ensemble is False else ("mean_probs" if ensemble is True else ensemble)
        with self._eval_mode():
            return generation.generate(self, input_ids, attention_mask, rule, **generate_options)

    @torch.no_grad()
    def sequence_uncertainty(self, sequences: Tensor, attention_mask: Tensor | None = None, *, prompt_length: int,
                             eos_token_id: int | Sequence[int] | None = None) -> generation.SequenceUncertainty:
        """Every member's view of generated ``sequences`` (from :meth:`generate`, per member or of the
        ensemble), in eval mode without gradients: per generated token and per sequence the entropy of
        the mean, expected entropy, mutual information, reverse mutual information and expected pairwise
        KL (LM-Polygraph's definitions), and each member's sequence log-probability. See
        :func:`lora_ensemble.generation.sequence_uncertainty` for the arguments."""
        with self._eval_mode():
            return generation.sequence_uncertainty(self, sequences, attention_mask, prompt_length=prompt_length,
                                                   eos_token_id=eos_token_id)

    def select_members_(self, members: slice) -> LoRAEnsemble:
        """Keep only ``members``, in place: every parameter of :meth:`member_parameters` (each wrapped
        layer's ``lora_A [N, r, d]`` and ``lora_B [N, k, r]``, every head parameter ``[N, ...]``) is
        sliced along dim 0 into a new Parameter, and every member count becomes the block's size.
        Build optimizers after this call. Returns ``self``.

        Raises:
            ValueError: a strided slice, or one that keeps no member (slices clip to ``range(N)`` as
                Python's do); the ensemble is left unchanged.
        """
        kept = range(self.num_members)[members]
        if len(kept) == 0 or members.step not in (None, 1):
            raise ValueError(f"members must be a non-empty contiguous slice of range({self.num_members}), "
                             f"got {members}")
        for name, param in self.member_parameters().items():
            _set_by_name(self.model, name, nn.Parameter(param.detach()[members].clone(),
                                                        requires_grad=param.requires_grad))
        for module in self.modules():
            if isinstance(module, _PER_MEMBER_TYPES):
                module.num_members = len(kept)
        # The member count lives on the ensemble and on its direct-call check.
        self.num_members = self._replicator.num_members = len(kept)
        return self

    def extra_repr(self) -> str:
        return (f"num_members={self.num_members}, rank={self.rank}, alpha={self.alpha}, init={self.init!r}, "
                f"targets={len(self.target_names)}, heads={self.head_names}, replicate_at={self.replicate_at!r}, "
                f"share_first_input={self.share_first_input}, member_chunk_size={self.member_chunk_size}")
