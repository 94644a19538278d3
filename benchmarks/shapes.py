"""What the benchmarks run: the device, the dtype, the GPU shapes of the issue and a scaled-down set
for CPU-only machines.

``N`` members, ``M`` rows per member, ``d`` in, ``k`` out, ``r`` rank. Device: ``cuda`` when one is
present, else ``cpu``. The shape set follows the device (CUDA: :data:`GPU_OP_SHAPES`, else
:data:`CPU_OP_SHAPES`) unless ``LORA_ENSEMBLE_BENCH_SHAPES`` is ``gpu`` or ``cpu``. The dtype is
bfloat16 on CUDA and float32 on CPU unless ``LORA_ENSEMBLE_BENCH_DTYPE`` names one of
:data:`BENCH_DTYPES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = [
    "BENCH_DTYPES",
    "CPU_E2E",
    "CPU_HEADLINE",
    "CPU_OP_SHAPES",
    "GPU_E2E",
    "GPU_HEADLINE",
    "GPU_OP_SHAPES",
    "EndToEndShape",
    "OpShape",
    "bench_device",
    "bench_dtype",
    "selected_e2e_shape",
    "selected_op_shapes",
]


@dataclass(frozen=True)
class OpShape:
    """One LoRA-Ensemble linear layer: ``x [N*M, d]``, ``W0 [k, d]``, ``A [N, r, d]``, ``B [N, k, r]``.
    ``seq_len`` splits the ``M`` rows of a member into sequences (``M = B * seq_len``), for the
    ``vmap_paper`` provider's sequence-first layout; None: one sequence of ``M`` tokens."""

    label: str
    num_members: int
    rows: int
    d: int
    k: int
    rank: int
    seq_len: int | None = None

    @property
    def sequence_length(self) -> int:
        """Tokens per sequence: ``seq_len``, else ``rows``."""
        return self.seq_len or self.rows

    def __str__(self) -> str:
        return f"{self.label} N{self.num_members} M{self.rows} d{self.d} k{self.k} r{self.rank}"


@dataclass(frozen=True)
class EndToEndShape:
    """A torchvision ViT (``image_size / patch_size`` patches per side, plus a class token) made into
    a ``num_members``-member LoRA-Ensemble of rank ``rank`` on q, k, v and out_proj of every block."""

    label: str
    num_members: int
    rank: int
    image_size: int
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    num_classes: int
    infer_batch: int
    train_batch: int

    def __str__(self) -> str:
        return f"{self.label} N{self.num_members} r{self.rank}"


VIT_TOKENS = 50  # ViT-B/32 at 224 px (and the CPU set's ViT widths): 7*7 patches + a class token


def _sweep(base: OpShape, label: str, **changes: int) -> OpShape:
    fields = {**base.__dict__, "label": label, **changes}
    return OpShape(**fields)


def _dedupe(shapes: list[OpShape]) -> list[OpShape]:
    seen: set[tuple[int, ...]] = set()
    unique = []
    for s in shapes:
        key = (s.num_members, s.rows, s.d, s.k, s.rank)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def _op_shapes(vit_d: int, infer_rows: int, train_rows: int, llm: list[OpShape], members: tuple[int, ...],
               ranks: tuple[int, ...], infer_ranks: tuple[int, ...] = ()) -> list[OpShape]:
    """ViT-B/32 q/k/v/out_proj at inference and training batch (sequences of :data:`VIT_TOKENS`),
    an N sweep at the inference rows, a rank sweep at the training rows and one at the inference rows
    (``rank_infer``: where the Triton launcher may run a smaller row tile than its policy's, whose
    tiles of several members need a further rank pass), and LLM projections."""
    infer = OpShape("vit_infer", 16, infer_rows, vit_d, vit_d, 8, seq_len=VIT_TOKENS)
    train = OpShape("vit_train", 16, train_rows, vit_d, vit_d, 8, seq_len=VIT_TOKENS)
    return _dedupe(
        [infer, train]
        + [_sweep(infer, "members", num_members=n) for n in members]
        + [_sweep(train, "rank", rank=r) for r in ranks]
        + [_sweep(infer, "rank_infer", rank=r) for r in infer_ranks]
        + llm
    )


def _llm_shapes(width: int, prompt_rows: int, prefill_rows: int) -> list[OpShape]:
    """A Llama-class q_proj (``width`` in and out, rank 16): 4 members over a long prompt, and 16
    members at decode (1 and 16 rows per member: one token of one or of 16 sequences) and prefill."""
    return [OpShape("llm", 4, prompt_rows, width, width, 16),
            OpShape("llm_decode", 16, 1, width, width, 16),
            OpShape("llm_decode_b16", 16, 16, width, width, 16),
            OpShape("llm_prefill", 16, prefill_rows, width, width, 16)]


# ViT-B/32 at 224 px: 7*7 patches + class token = 50 tokens per image; batch 1 -> 50 rows per member,
# training batch 32 -> 1600 rows per member; d = k = 768. Llama-7B-class q_proj: 4096 x 4096; prefill
# of a 512-token prompt -> 512 rows per member.
GPU_OP_SHAPES: list[OpShape] = _op_shapes(
    vit_d=768, infer_rows=50, train_rows=1600,
    llm=_llm_shapes(width=4096, prompt_rows=1024, prefill_rows=512),
    members=(1, 4, 16, 64), ranks=(4, 8, 16, 32, 64), infer_ranks=(32, 64),
)
# The same families, scaled so the whole CPU suite runs in minutes on 2 cores.
CPU_OP_SHAPES: list[OpShape] = _op_shapes(
    vit_d=192, infer_rows=50, train_rows=200,
    llm=_llm_shapes(width=1024, prompt_rows=64, prefill_rows=32),
    members=(1, 4, 16, 64), ranks=(4, 16, 64),
)


def _shape(shapes: list[OpShape], label: str) -> OpShape:
    return next(s for s in shapes if s.label == label)


def _headline(shapes: list[OpShape]) -> list[tuple[OpShape, tuple[str, ...]]]:
    return [(_shape(shapes, "llm_decode"), ("fwd",)), (_shape(shapes, "vit_infer"), ("fwd", "fwd_bwd")),
            (_shape(shapes, "vit_train"), ("fwd", "fwd_bwd")), (_shape(shapes, "llm_prefill"), ("fwd",))]


# The rows that decide the design (the first GPU pass measures them, most decisive first): LLM decode
# (W0 read once per member or once for all), ViT-B/32 at batch 1 and 32 for inference and training,
# LLM prefill (compute-bound). Each is (shape, modes).
GPU_HEADLINE: list[tuple[OpShape, tuple[str, ...]]] = _headline(GPU_OP_SHAPES)
# The same rows with tiny sizes for the CPU smoke run (sizes 16-byte aligned, so grouped_mm runs).
CPU_HEADLINE: list[tuple[OpShape, tuple[str, ...]]] = [
    (OpShape("llm_decode", 4, 1, 64, 64, 8), ("fwd",)),
    (OpShape("vit_infer", 4, 5, 32, 32, 8, seq_len=5), ("fwd", "fwd_bwd")),
    (OpShape("vit_train", 4, 20, 32, 32, 8, seq_len=5), ("fwd", "fwd_bwd")),
    (OpShape("llm_prefill", 4, 16, 64, 64, 8), ("fwd",)),
]

# torchvision vit_b_32 with random weights; 16 members, rank 8 (the paper's CIFAR-100 set-up).
GPU_E2E = EndToEndShape("vit_b_32", num_members=16, rank=8, image_size=224, patch_size=32, num_layers=12,
                        num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=100, infer_batch=1,
                        train_batch=32)
# ViT-Ti widths, 2 blocks, the same 7x7 patch grid; training batch cut to 2 for 2 CPU cores.
CPU_E2E = EndToEndShape("vit_ti2_32", num_members=16, rank=8, image_size=224, patch_size=32, num_layers=2,
                        num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=100, infer_batch=1,
                        train_batch=2)


def _gpu_set() -> bool:
    choice = os.environ.get("LORA_ENSEMBLE_BENCH_SHAPES", "")
    if choice not in ("", "gpu", "cpu"):
        raise ValueError(f"LORA_ENSEMBLE_BENCH_SHAPES must be 'gpu' or 'cpu', got {choice!r}")
    return choice == "gpu" or (choice == "" and torch.cuda.is_available())


def selected_op_shapes() -> list[OpShape]:
    """The op-level shapes for this machine (see the module docstring)."""
    return GPU_OP_SHAPES if _gpu_set() else CPU_OP_SHAPES


def selected_e2e_shape() -> EndToEndShape:
    """The end-to-end model for this machine (see the module docstring)."""
    return GPU_E2E if _gpu_set() else CPU_E2E


BENCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype() -> torch.dtype:
    """``LORA_ENSEMBLE_BENCH_DTYPE``, else bfloat16 on CUDA and float32 on CPU."""
    name = os.environ.get("LORA_ENSEMBLE_BENCH_DTYPE", "")
    if name == "":
        return torch.bfloat16 if bench_device().type == "cuda" else torch.float32
    if name not in BENCH_DTYPES:
        raise ValueError(f"LORA_ENSEMBLE_BENCH_DTYPE must be one of {sorted(BENCH_DTYPES)}, got {name!r}")
    return BENCH_DTYPES[name]
