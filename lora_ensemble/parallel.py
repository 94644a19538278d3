"""Member parallelism: the ``N`` members of a :class:`~lora_ensemble.LoRAEnsemble` split across ranks.

Every rank of a process group holds the whole frozen backbone (``W0`` and every layer that is not
per-member) and a contiguous block of the members: ``lora_A[n]``, ``lora_B[n]`` of every wrapped
layer and ``head[n]`` for ``n`` in :func:`member_slice`. A forward runs only this rank's members on
the input of the source rank (broadcast), and the member logits are all-gathered into ``[N, B, C]``
in member order, so :meth:`MemberParallelEnsemble.predict` returns what one device running all
``N`` members returns::

    rank r:   logits[n] = head[n](backbone_n(x_src))     for n in member_slice(N, world, r)
    gathered: cat over ranks -> [N, B, C]                 (all_gather, padded to the largest block)

Training needs no gradient communication: the members are independent (the backbone is frozen and
every trainable parameter belongs to one member), so each rank backpropagates the loss of its own
members. Works with any backend that ``torch.distributed`` supports: ``gloo`` on CPU, ``nccl`` on
CUDA (one process per GPU, model and inputs on ``cuda:<local rank>``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ensemble import EnsemblePrediction, LoRAEnsemble

__all__ = ["MemberParallelEnsemble", "member_slice"]


def member_slice(num_members: int, world_size: int, rank: int) -> slice:
    """The members rank ``rank`` of ``world_size`` holds: a contiguous block, sizes differing by at
    most one (the first ``num_members % world_size`` ranks hold one more).

    Raises:
        ValueError: fewer members than ranks (a rank would hold none), or ``rank`` out of range.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_members < world_size:
        raise ValueError(f"num_members={num_members} < world_size={world_size}: every rank needs at least one member")
    base, extra = divmod(num_members, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _shared_trainable(ensemble: LoRAEnsemble) -> list[str]:
    """Names of trainable parameters that do not belong to one member (they would need an all-reduce)."""
    per_member = {id(p) for p in ensemble.member_parameters().values()}
    return [name for name, p in ensemble.named_parameters() if p.requires_grad and id(p) not in per_member]


class MemberParallelEnsemble(nn.Module):
    """A :class:`~lora_ensemble.LoRAEnsemble` whose members are split across a process group.

    Construct it on every rank from identically initialised ensembles (same seed, or weights loaded
    from one checkpoint); each rank then keeps only its block of members (:func:`member_slice`,
    :meth:`LoRAEnsemble.select_members_`).

    Args:
        ensemble: the full ensemble (``N`` members); it is sliced in place.
        process_group: the group to split over (None: the default group).
        src: the group rank whose inputs every rank uses in :meth:`predict` / :meth:`broadcast`.

    Attributes:
        num_members: ``N``, the size of the whole ensemble.
        members: this rank's slice of ``range(N)``.
        member_counts: the number of members of each group rank.

    Raises:
        ValueError: a trainable parameter shared by all members (an unfrozen backbone layer): its
            gradient would need an all-reduce that member parallelism does not do.

    Example (``torchrun --nproc-per-node=4 script.py``; one GPU per process)::

        dist.init_process_group("nccl")
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        torch.manual_seed(0)                                  # identical backbone and members everywhere
        ensemble = LoRAEnsemble(vit, num_members=16, rank=4).to(f"cuda:{local_rank}")
        parallel = MemberParallelEnsemble(ensemble)           # this rank keeps 4 members
        optimizer = torch.optim.AdamW([p for p in parallel.parameters() if p.requires_grad])
        (images, labels), _ = parallel.broadcast(images, labels)      # rank 0's batch on every rank
        logits = parallel(images)                             # [4, B, C]: this rank's members only
        loss = sum(F.cross_entropy(member, labels) for member in logits)
        loss.backward(); optimizer.step()                     # no gradient communication
        prediction = parallel.predict(images)                 # [16, B, C] gathered; same on every rank
    """

    def __init__(self, ensemble: LoRAEnsemble, process_group: dist.ProcessGroup | None = None, src: int = 0) -> None:
        super().__init__()
        shared = _shared_trainable(ensemble)
        if shared:
            raise ValueError(f"member parallelism needs every trainable parameter to belong to one member; "
                             f"these are shared by all members and trainable: {shared}")
        self.process_group = process_group
        world_size = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
        if not 0 <= src < world_size:
            raise ValueError(f"src must be a group rank in [0, {world_size}), got {src}")
        self.src = src
        self._src_global = src if process_group is None else dist.get_global_rank(process_group, src)
        self.num_members = ensemble.num_members
        self.members = member_slice(self.num_members, world_size, rank)
        self.member_counts = [len(range(self.num_members)[member_slice(self.num_members, world_size, r)])
                              for r in range(world_size)]
        self.ensemble = ensemble.select_members_(self.members)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """This rank's members on these inputs: ``[members on this rank, B, ...]`` (differentiable;
        no communication). Train with a loss over these members only."""
        return self.ensemble(*args, **kwargs)

    def broadcast(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict[str, Any]]:
        """The source rank's tensors in place of every rank's: each tensor argument must have the same
        shape and dtype on every rank (its values on other ranks are ignored and left untouched)."""
        is_src = dist.get_rank(self.process_group) == self.src

        def bcast(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            buf = v.contiguous() if is_src else torch.empty(v.shape, dtype=v.dtype, device=v.device)
            dist.broadcast(buf, src=self._src_global, group=self.process_group)
            return buf

        return tuple(bcast(a) for a in args), {k: bcast(v) for k, v in kwargs.items()}

    def all_gather_members(self, local: Tensor) -> Tensor:
        """``[members on this rank, ...]`` from every rank -> ``[N, ...]`` in member order (not
        differentiable). Trailing dims must agree across ranks."""
        if local.shape[0] != self.member_counts[dist.get_rank(self.process_group)]:
            raise ValueError(f"local has {local.shape[0]} members on dim 0 (shape {tuple(local.shape)}), "
                             f"this rank holds {self.member_counts[dist.get_rank(self.process_group)]}")
        most = max(self.member_counts)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local.detach()
        blocks = [torch.empty_like(padded) for _ in self.member_counts]
        dist.all_gather(blocks, padded, group=self.process_group)
        return torch.cat([block[:count] for block, count in zip(blocks, self.member_counts, strict=False)])

    @torch.no_grad()
    def logits(self, *args: Any, **kwargs: Any) -> Tensor:
        """Every member's logits ``[N, B, ...]`` on the source rank's inputs, on every rank."""
        args, kwargs = self.broadcast(*args, **kwargs)
        return self.all_gather_members(self(*args, **kwargs))

    @torch.no_grad()
    def predict(self, *args: Any, **kwargs: Any) -> EnsemblePrediction:
        """:meth:`LoRAEnsemble.predict` of the whole ensemble on the source rank's inputs, on every rank."""
        return EnsemblePrediction.from_logits(self.logits(*args, **kwargs))

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, members={self.members}, member_counts={self.member_counts}"
