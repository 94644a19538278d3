"""DDP, FSDP2 and member parallelism of a LoRA-Ensemble-wrapped tiny timm ViT, on CPU with gloo.

One pair of processes (spawned once for the module) runs every scenario and saves what each rank saw;
each test then compares it with the same run in one process: losses per step, trained LoRA factors and
heads, and member-parallel predictions must agree to float32 rounding.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lora_ensemble import LoRAEnsemble
from lora_ensemble.parallel import MemberParallelEnsemble, member_slice

from .utils import assert_close_named

WORLD_SIZE = 2
NUM_MEMBERS = 3  # not a multiple of WORLD_SIZE: FSDP2 and member parallelism split unevenly
NUM_CLASSES = 5
BATCH = 4
STEPS = 3
LR = 0.05
TOL = (1e-5, 1e-4)  # float32, different reduction orders (all-reduce of half-batch gradients)


class _Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def build_ensemble(checkpointed: bool = False, **options) -> LoRAEnsemble:
    """The same tiny ViT ensemble in every process: seeded init, random ``lora_B`` (not the zero init,
    so every LoRA factor gets a gradient from the first step)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    if checkpointed:
        vit.blocks = nn.Sequential(*(_Checkpointed(block) for block in vit.blocks))
    options = {"replicate_at": "blocks", **options}
    ensemble = LoRAEnsemble(vit, NUM_MEMBERS, rank=2, target_modules=("attn.qkv", "attn.proj", "mlp.fc1"), **options)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0.0, 0.2)
    return ensemble


def make_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return images, labels


def ensemble_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The mean over members and samples of the cross-entropy; ``logits [N, B, C]``."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))


def member_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over members of each member's mean cross-entropy: members train independently."""
    return sum(nn.functional.cross_entropy(member, labels) for member in logits)


def train(model: nn.Module, images: Tensor, labels: Tensor, loss_fn: Callable) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_trained(trained: dict[str, Tensor], initial: dict[str, Tensor]) -> None:
    """Every trainable tensor moved: a comparison after training would otherwise prove little."""
    still = [name for name, t in trained.items() if torch.equal(t, initial[name])]
    assert not still, f"unchanged by training: {still}"


# --- process plumbing ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A failing rank must not leave the other waiting in a collective for gloo's default 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable, *args) -> None:
    """Run ``worker(rank, *args)`` in ``WORLD_SIZE`` fresh processes joined by a gloo group."""
    mp.spawn(_entry, args=(_free_port(), worker, args), nprocs=WORLD_SIZE, join=True)


def _save_result(rank: int, worker: Callable[[int], dict], out_dir: str) -> None:
    torch.save(worker(rank), os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker: Callable[[int], dict], tmp_path_factory: pytest.TempPathFactory, name: str) -> list[dict]:
    """What ``worker(rank)`` returns in each of ``WORLD_SIZE`` gloo processes, rank by rank (skips the test
    when this torch has no gloo)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with gloo")
    out_dir = tmp_path_factory.mktemp(name)
    spawn(_save_result, worker, str(out_dir))
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _all_reduce_mean(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _worker(rank: int) -> dict:
    return {"ddp": _ddp_run(rank), "fsdp": _fsdp_run(rank), "members": _member_parallel_run(rank)}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every scenario below, run once in one pair of processes (starting them costs more than the runs)."""
    return run_ranks(_worker, tmp_path_factory, "distributed")


# --- DDP ------------------------------------------------------------------------------------------


def _ddp_run(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    images, labels = make_data()
    shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    results = {}
    for checkpointed in (False, True):
        ensemble = build_ensemble(checkpointed)
        ddp = DistributedDataParallel(ensemble, find_unused_parameters=False)
        local_losses = train(ddp, images[shard], labels[shard], ensemble_loss)
        frozen_grads = [name for name, p in ensemble.named_parameters() if not p.requires_grad and p.grad is not None]
        results[checkpointed] = {
            "losses": [_all_reduce_mean(loss) for loss in local_losses],
            "state": trainable_state(ensemble),
            "frozen_grads": frozen_grads,
        }
    return results


def test_ddp_matches_one_process(distributed_runs: list[dict]) -> None:
    results = distributed_runs[0]["ddp"]
    images, labels = make_data()
    for checkpointed, got in results.items():
        ensemble = build_ensemble(checkpointed)
        want_losses = train(ensemble, images, labels, ensemble_loss)
        assert got["frozen_grads"] == [], f"frozen parameters got gradients: {got['frozen_grads']}"
        assert_close_named(f"losses (checkpointed={checkpointed})", torch.tensor(got["losses"]),
                           torch.tensor(want_losses, dtype=torch.float64), torch.float32, TOL)
        want_state = trainable_state(ensemble)
        assert_trained(want_state, trainable_state(build_ensemble(checkpointed)))
        assert got["state"].keys() == want_state.keys()
        for name, want in want_state.items():
            assert_close_named(f"{name} (checkpointed={checkpointed})", got["state"][name], want.double(),
                               torch.float32, TOL)


# --- FSDP2 ----------------------------------------------------------------------------------------


def _fsdp_run(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    images, labels = make_data()
    shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    ensemble = build_ensemble()
    for block in ensemble.model.blocks:  # the unit holds W0, A and B of every fused layer it runs
        fully_shard(block, mesh=mesh)
    fully_shard(ensemble, mesh=mesh)
    lora_A = ensemble.model.blocks[0].attn.qkv.lora_A
    sharded = isinstance(lora_A, DTensor) and lora_A.to_local().shape[0] < NUM_MEMBERS
    local_losses = train(ensemble, images[shard], labels[shard], ensemble_loss)
    state = {name: p.full_tensor() for name, p in ensemble.named_parameters() if p.requires_grad}
    return {"losses": [_all_reduce_mean(loss) for loss in local_losses], "state": state, "sharded": sharded}


def test_fsdp2_fully_shard_matches_one_process(distributed_runs: list[dict]) -> None:
    got = distributed_runs[0]["fsdp"]
    assert got["sharded"], "lora_A should be a DTensor sharded over the members"
    images, labels = make_data()
    ensemble = build_ensemble()
    want_losses = train(ensemble, images, labels, ensemble_loss)
    assert_close_named("losses", torch.tensor(got["losses"]), torch.tensor(want_losses, dtype=torch.float64),
                       torch.float32, TOL)
    want_state = trainable_state(ensemble)
    assert got["state"].keys() == want_state.keys()
    for name, want in want_state.items():
        assert_close_named(name, got["state"][name], want.double(), torch.float32, TOL)


# --- member parallelism ---------------------------------------------------------------------------


def _member_parallel_run(rank: int) -> dict:
    images, labels = make_data()
    if rank != 0:  # only the source rank's inputs count: the others hold garbage of the right shape
        images, labels = torch.full_like(images, float("nan")), torch.zeros_like(labels)
    parallel = MemberParallelEnsemble(build_ensemble()).eval()
    before = parallel.predict(images)
    (images, labels), _ = parallel.broadcast(images, labels)
    losses = train(parallel, images, labels, member_loss_sum)
    after = parallel.predict(images)
    # The same prediction from inputs held by rank 1 only, over an explicit process group.
    images_on_1 = make_data()[0] if rank == 1 else torch.zeros(BATCH, 3, 16, 16)
    from_rank_1 = MemberParallelEnsemble(build_ensemble().eval(), process_group=dist.new_group([0, 1]), src=1)
    return {"members": parallel.members, "num_local": parallel.ensemble.num_members, "before": vars(before),
            "after": vars(after), "local_losses": losses, "from_rank_1": vars(from_rank_1.predict(images_on_1))}


def test_member_parallel_predict_and_training_match_one_process(distributed_runs: list[dict]) -> None:
    ranks = [run["members"] for run in distributed_runs]
    assert [r["members"] for r in ranks] == [slice(0, 2), slice(2, 3)]
    assert [r["num_local"] for r in ranks] == [2, 1]

    images, labels = make_data()
    ensemble = build_ensemble().eval()
    want_before = vars(ensemble.predict(images))
    want_losses = train(ensemble, images, labels, member_loss_sum)
    want_after = vars(ensemble.predict(images))
    for rank, got in enumerate(ranks):
        for when, want in (("before", want_before), ("after", want_after), ("from_rank_1", want_before)):
            for field, value in want.items():
                assert_close_named(f"rank {rank} {when}: {field}", got[when][field], value.double(),
                                   torch.float32, TOL)
    # Each rank's loss is the sum over its members; together they are the one-process loss.
    summed = torch.tensor([sum(step) for step in zip(*(r["local_losses"] for r in ranks), strict=False)])
    assert_close_named("summed member losses", summed, torch.tensor(want_losses, dtype=torch.float64),
                       torch.float32, TOL)


# --- without processes ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_members,world_size", [(1, 1), (3, 2), (4, 2), (7, 3), (8, 8)])
def test_member_slice_covers_every_member_once_in_balanced_blocks(num_members: int, world_size: int) -> None:
    slices = [member_slice(num_members, world_size, r) for r in range(world_size)]
    members = [n for s in slices for n in range(num_members)[s]]
    assert members == list(range(num_members))
    sizes = [len(range(num_members)[s]) for s in slices]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_member_slice_rejects_more_ranks_than_members() -> None:
    with pytest.raises(ValueError, match="num_members=2 < world_size=3"):
        member_slice(2, 3, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        member_slice(4, 2, 2)


@pytest.mark.parametrize("options", [{}, {"replicate_at": None}, {"share_first_input": True}],
                         ids=["replicate-at-blocks", "replicate-at-entry", "share-first-input"])
@pytest.mark.parametrize("members", [slice(0, 1), slice(1, 3), slice(0, 3)])
def test_select_members_keeps_exactly_those_members(members: slice, options: dict) -> None:
    ensemble = build_ensemble(**options).eval()
    images, _ = make_data()
    with torch.no_grad():
        full = ensemble(images)
        kept = ensemble.select_members_(members)(images)
    assert kept.shape[0] == len(range(NUM_MEMBERS)[members])
    assert_close_named("kept logits", kept, full[members].double(), torch.float32)
    for layer in ensemble.lora_layers().values():
        assert layer.lora_A.shape[0] == layer.lora_B.shape[0] == layer.num_members == kept.shape[0]


def test_member_parallel_refuses_shared_trainable_parameters() -> None:
    ensemble = build_ensemble()
    ensemble.model.norm.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        MemberParallelEnsemble(ensemble)


@pytest.mark.parametrize("members", [slice(3, 5), slice(1, 1), slice(0, 3, 2)])
def test_select_members_rejects_empty_or_strided_slices(members: slice) -> None:
    ensemble = build_ensemble()
    with pytest.raises(ValueError, match="non-empty contiguous slice"):
        ensemble.select_members_(members)
    assert ensemble.num_members == NUM_MEMBERS, "a refused selection must leave the ensemble as it was"
