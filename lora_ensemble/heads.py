"""Per-member heads: :class:`EnsembleHead` (one ``nn.Linear`` per member, one batched GEMM) and
:class:`PerMemberModule` (any module, e.g. a classifier of several layers, copied once per member:
what peft calls ``modules_to_save``).

Both take member-major input ``[N*B, ...]`` (rows ``n*B:(n+1)*B`` are member ``n``) and keep every
parameter stacked along a leading member dim ``[N, ...]``, so slicing members is slicing dim 0: a
:class:`~lora_ensemble.LoRAEnsemble` member chunk runs the slice it selected on this thread
(:mod:`lora_ensemble.calls`). A forward changes no module state: threads may call one head at once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .calls import MEMBER_SELECTION

__all__ = ["EnsembleHead", "PerMemberModule"]


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
        weight, bias = _selected(self.weight), _selected(self.bias)
        num_members = weight.shape[0]  # not self.num_members: a member chunk runs a slice
        if x.shape[0] % num_members != 0:
            raise ValueError(f"EnsembleHead: leading dim {x.shape[0]} (x shape {tuple(x.shape)}) is not "
                             f"divisible by num_members={num_members}")
        rows = x.reshape(num_members, -1, self.in_features)
        if bias is None:
            out = torch.bmm(rows, weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.out_features)

    def stacked_parameters(self) -> dict[str, nn.Parameter]:
        """``{"weight": [N, C, H], "bias": [N, C]}`` (no bias when there is none): each parameter of
        one member's ``nn.Linear``, by its name there, stacked over members."""
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

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


class PerMemberModule(nn.Module):
    """``N`` copies of one module; member ``n``'s copy runs on member ``n``'s rows.

    The copies share the structure of ``self.module`` and each of its parameters is stored stacked,
    ``[N, *shape]`` under its own name (``classifier.module.dense.weight [N, H, H]``); member ``n``
    runs a copy of ``self.module``'s module tree (sharing its tensors, made per call so that no call
    swaps the parameters of a module another thread runs) with every parameter's slice ``[n]``
    (``torch.func.functional_call``), one call per member (heads are small; the backbone is the stacked
    part). Buffers are shared by all
    members. In training mode stochastic layers (dropout) draw independently per member.

    Input: the module's first positional argument ``[N*B, ...]`` member-major (further arguments
    are passed to every member unchanged); output ``[N*B, ...]``, the members' outputs stacked.

    Attributes:
        module: the template, holding the stacked parameters (it cannot run on its own).
        num_members: ``N``.
    """

    def __init__(self, copies: Sequence[nn.Module]) -> None:
        super().__init__()
        if not copies:
            raise ValueError("PerMemberModule needs at least one copy")
        template = copy.deepcopy(copies[0])  # the copies themselves are left as they are
        self.param_names = [name for name, _ in template.named_parameters()]
        stacked = {name: torch.stack([c.get_parameter(name).detach() for c in copies]) for name in self.param_names}
        for name, value in stacked.items():
            owner, _, attr = name.rpartition(".")
            setattr(template.get_submodule(owner), attr, nn.Parameter(value.clone()))
        self.module = template
        self.num_members = len(copies)

    @classmethod
    def from_module(cls, module: nn.Module, num_members: int, num_classes: int | None = None) -> PerMemberModule:
        """Every member starts as a copy of ``module``; with ``num_classes`` the copies' last
        ``nn.Linear`` (in module order) is replaced by a fresh ``nn.Linear(in, num_classes)``, drawn
        independently per member. ``module`` itself is left as it is."""
        copies = [copy.deepcopy(module) for _ in range(num_members)]
        if num_classes is not None:
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"num_classes={num_classes} replaces the last nn.Linear of the head, and "
                                 f"{type(module).__name__} has none")
            owner, _, attr = linears[-1].rpartition(".")
            for c in copies:
                old = c.get_submodule(linears[-1])
                w = old.weight
                setattr(c.get_submodule(owner), attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                                                               device=w.device, dtype=w.dtype))
        return cls(copies)

    def stacked_parameters(self) -> dict[str, nn.Parameter]:
        """Each parameter of one member's module, by its name there (``dense.weight``), stacked over
        members: ``[N, *shape]``."""
        return {name: attrgetter(name)(self.module) for name in self.param_names}

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x [N*B, ...]`` -> the members' outputs ``[N*B, ...]``."""
        stacked = {name: _selected(p) for name, p in self.stacked_parameters().items()}
        num_members = next(iter(stacked.values())).shape[0]  # a member chunk runs a slice
        if x.shape[0] % num_members != 0:
            raise ValueError(f"PerMemberModule: leading dim {x.shape[0]} (x shape {tuple(x.shape)}) is not "
                             f"divisible by num_members={num_members}")
        # functional_call swaps parameters in place for the call: on a private copy of the module tree
        # (torch.compile traces the swap away and needs no copy).
        module = self.module if torch.compiler.is_compiling() else _tree_copy(self.module)
        outs = [functional_call(module, {name: p[n] for name, p in stacked.items()}, (rows, *args), kwargs)
                for n, rows in enumerate(x.chunk(num_members))]
        return torch.cat(outs)

    def merged_member(self, member: int) -> nn.Module:
        """Member ``member``'s copy as an independent plain module."""
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members}), got {member}")
        plain = copy.deepcopy(self.module)
        with torch.no_grad():
            for name in self.param_names:
                owner, _, attr = name.rpartition(".")
                setattr(plain.get_submodule(owner), attr, nn.Parameter(plain.get_parameter(name)[member].clone()))
        return plain

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}"


def _selected(param: Tensor | None) -> Tensor | None:
    """``param [N, ...]`` sliced to the members selected on this thread (all of them when none is)."""
    members = MEMBER_SELECTION.value
    return param if members is None or param is None else param[members]


def _tree_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module objects, each with its own parameter, buffer and child dicts, sharing
    every tensor, hook and other attribute: what ``functional_call`` may swap parameters on while
    another thread runs ``module``."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if child is None else _tree_copy(child) for name, child in module._modules.items()}
    return clone
