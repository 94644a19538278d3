# Launch configurations shared by the Triton kernels of this package: autotune lists for NVIDIA
# GPUs (Ampere and Hopper), the single configuration used under TRITON_INTERPRET=1 (the
# interpreter cannot benchmark), and the heuristics that fix the row and rank tiles from the shapes.
"""Autotune configurations and tile heuristics for the kernels in :mod:`lora_ensemble.kernels`."""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "FUSED_MATMUL_GPU_CONFIGS",
    "INTERPRETER_FUSED_MATMUL_CONFIG",
    "INTERPRETER_WEIGHT_GRADS_CONFIG",
    "WEIGHT_GRADS_GPU_CONFIGS",
    "block_rank",
    "block_rows",
    "fitting_fused_matmul_configs",
    "fitting_weight_grads_configs",
    "fused_matmul_block_rows",
    "fused_matmul_configs",
    "fused_matmul_output_tiles",
    "interpreting",
    "prune_fused_matmul_configs",
    "prune_weight_grads_configs",
    "weight_grads_configs",
]

MIN_DOT_TILE = 16  # a 16-bit tl.dot on NVIDIA needs every dimension >= 16
MAX_BLOCK_ROWS = 128


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_rank(rank: int) -> int:
    """Rank tile: the next power of two >= ``rank``, at least 16 (tensor-core minimum); masked."""
    return max(MIN_DOT_TILE, triton.next_power_of_2(rank))


def block_rows(rows: int, block_r: int = MIN_DOT_TILE, output_tiles: int = 1) -> int:
    """Row tile for ``rows`` rows per member: small batches (batch-1 inference of an ensemble has
    tens of rows per member) get a small tile instead of a mostly masked 128-row one. The tile is
    at most 64 rows when the rank tile is above 64 or the kernel keeps two output tiles live (the
    shared-input forward), where 128 rows leave ptxas too few registers."""
    cap = MAX_BLOCK_ROWS // 2 if (block_r > 64 or output_tiles > 1) else MAX_BLOCK_ROWS
    return min(cap, max(MIN_DOT_TILE, triton.next_power_of_2(rows)))


def fused_matmul_block_rows(args: dict) -> int:
    """``BLOCK_M`` heuristic of the fused matmul kernels, from their launch arguments."""
    return block_rows(args["M"], args["BLOCK_R"], fused_matmul_output_tiles(args))


def fused_matmul_output_tiles(args: dict) -> int:
    """How many [BLOCK_M, BLOCK_N] fp32 tiles a fused matmul kernel keeps live: two in the
    shared-input forward (the base tile and one member's output), else one."""
    return 2 if args.get("SUM_MEMBERS") is False else 1


def _cfg(num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Fused matmul (forward, and the dx backward): BLOCK_M comes from block_rows(M); these tile the
# output columns (BLOCK_N) and the reduction (BLOCK_K). Sizes follow the Triton matmul tutorial's
# Ampere/Hopper lists, trimmed to leave registers for the [BLOCK_M, BLOCK_R] low-rank accumulator.
FUSED_MATMUL_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 5, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    _cfg(8, 3, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
)
INTERPRETER_FUSED_MATMUL_CONFIG = _cfg(4, 2, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)

# Weight gradients: BLOCK_M tiles the reduction over rows, BLOCK_C the output columns.
WEIGHT_GRADS_GPU_CONFIGS: tuple[triton.Config, ...] = (
    _cfg(4, 4, BLOCK_M=64, BLOCK_C=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_C=128),
    _cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
    _cfg(4, 5, BLOCK_M=32, BLOCK_C=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_C=256),
)
INTERPRETER_WEIGHT_GRADS_CONFIG = _cfg(4, 2, BLOCK_M=32, BLOCK_C=32)


def fused_matmul_configs() -> list[triton.Config]:
    """The autotune list of the fused matmul kernels on this machine."""
    return [INTERPRETER_FUSED_MATMUL_CONFIG] if interpreting() else list(FUSED_MATMUL_GPU_CONFIGS)


def weight_grads_configs() -> list[triton.Config]:
    """The autotune list of the weight-gradient kernel on this machine."""
    return [INTERPRETER_WEIGHT_GRADS_CONFIG] if interpreting() else list(WEIGHT_GRADS_GPU_CONFIGS)


def _keep_fitting(configs: list[triton.Config], limits: dict[str, int]) -> list[triton.Config]:
    """Drop configs whose tiles exceed the (power-of-two rounded) problem size; keep at least one,
    the one with the smallest tiles."""
    bound = {name: max(MIN_DOT_TILE * 2, triton.next_power_of_2(size)) for name, size in limits.items()}
    kept = [c for c in configs if all(c.kwargs[name] <= bound[name] for name in bound)]
    if kept:
        return kept
    return [min(configs, key=lambda c: tuple(c.kwargs[name] for name in bound))]


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one program may use on a CUDA ``device`` (bytes)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def fitting_fused_matmul_configs(
    configs: list[triton.Config],
    *,
    n_cols: int,
    k_dim: int,
    element_size: int,
    block_m: int,
    block_r: int,
    output_tiles: int,
    shared_memory: int,
) -> list[triton.Config]:
    """The fused matmul configs worth trying: no column or reduction tile wider than the matrix,
    pipelined tiles within ``shared_memory`` bytes, and fp32 accumulators (``output_tiles`` of
    [block_m, BLOCK_N] plus [block_m, block_r]) within 128 registers a thread (more spills).
    Never empty: falls back to the config with the smallest tiles."""
    kept = _keep_fitting(configs, {"BLOCK_N": n_cols, "BLOCK_K": k_dim})

    def fits(c: triton.Config) -> bool:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (block_m * bk + bk * bn + bk * block_r) * element_size
        acc_regs = (output_tiles * block_m * bn + block_m * block_r) / (32 * c.num_warps)
        return smem <= shared_memory and acc_regs <= 128

    return [c for c in kept if fits(c)] or [min(kept, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def fitting_weight_grads_configs(
    configs: list[triton.Config],
    *,
    rows: int,
    cols: int,
    element_size: int,
    block_r: int,
    shared_memory: int,
) -> list[triton.Config]:
    """The weight-gradient configs worth trying: no tile wider than the problem, pipelined tiles
    (fp32 P, ``element_size`` Z) within ``shared_memory`` bytes, the [block_r, BLOCK_C] fp32
    accumulator within 128 registers a thread. Never empty."""
    kept = _keep_fitting(configs, {"BLOCK_M": rows, "BLOCK_C": cols})

    def fits(c: triton.Config) -> bool:
        bm, bc = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"]
        smem = c.num_stages * (block_r * bm * 4 + bm * bc * element_size)
        return smem <= shared_memory and block_r * bc / (32 * c.num_warps) <= 128

    return [c for c in kept if fits(c)] or [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"])]


def prune_fused_matmul_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the fused matmul kernels (see :func:`fitting_fused_matmul_configs`)."""
    x = named_args["x_ptr"]
    return fitting_fused_matmul_configs(
        configs, n_cols=named_args["N_COLS"], k_dim=named_args["K_DIM"], element_size=x.element_size(),
        block_m=kwargs["BLOCK_M"], block_r=kwargs["BLOCK_R"],
        output_tiles=fused_matmul_output_tiles(kwargs),
        shared_memory=_shared_memory_limit(x.device),
    )


def prune_weight_grads_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the weight-gradient kernel (see :func:`fitting_weight_grads_configs`)."""
    z = named_args["za_ptr"]
    return fitting_weight_grads_configs(
        configs, rows=named_args["rows_per_split"], cols=max(named_args["COLS_A"], named_args["COLS_B"]),
        element_size=z.element_size(), block_r=kwargs["BLOCK_R"], shared_memory=_shared_memory_limit(z.device),
    )
