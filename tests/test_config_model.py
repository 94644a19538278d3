"""The config cost model (kernels/config_model.py) and the GPU facts it reads (kernels/gpu_specs.py):
pure functions, checked on the CPU against arithmetic done by hand and against the mechanisms the
model exists to capture (waves, W0 re-reads, latency hiding, shared-memory limits)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lora_ensemble.kernels import configs
from lora_ensemble.kernels.config_model import (
    KERNEL_OVERHEAD_S,
    GemmLaunch,
    best_configs,
    config_cost,
    rank_configs,
)
from lora_ensemble.kernels.gpu_specs import H100_SXM, arch_rates, gpu_spec_from_properties
from lora_ensemble.kernels.launch_policy import stacked_tiling


def cfg(warps: int, stages: int, n: int, k: int) -> SimpleNamespace:
    return SimpleNamespace(kwargs={"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def fused_launch(members: int, rows: int, d: int, k: int, rank_tile: int, block_m: int, row_tiles: int) -> GemmLaunch:
    dram = 2 * (members * rows * (d + k) + d * k + members * rank_tile * (d + k))
    return GemmLaunch(block_m, row_tiles, k, d, "16bit", 2, 2, dram, rank_tile=rank_tile, expands=1)


def test_gpu_spec_from_properties_gives_the_h100_spec_sheet():
    g = H100_SXM
    assert g.capability == 90 and g.sm_count == 132
    assert g.dram_bytes_per_s == pytest.approx(3.35e12, rel=0.01)  # 2 x 2619 MHz x 5120 bits / 8
    assert g.tensor16_flops == pytest.approx(1070e12, rel=0.01)  # 132 x 1.98 GHz x 4096 (989 at 1.83 GHz)
    assert g.fp32_flops == pytest.approx(66.9e12, rel=0.01)
    assert g.dot_flops("tf32x3") == pytest.approx(g.tf32_flops / 3)


def test_a100_and_unknown_architectures():
    a100 = gpu_spec_from_properties("A100", 8, 0, 108, 1410000, 1593000, 5120, 40 * 2**20, 167936, 166912, 65536,
                                    2048)
    assert a100.tensor16_flops == pytest.approx(312e12, rel=0.01)
    assert a100.fp32_flops == pytest.approx(19.5e12, rel=0.01)
    assert a100.dram_bytes_per_s == pytest.approx(2.04e12, rel=0.01)
    assert arch_rates(87) is arch_rates(86)  # nearest older entry
    assert arch_rates(120) is arch_rates(89)  # consumer Blackwell follows Ada
    assert arch_rates(75) is arch_rates(80)


def test_compute_bound_launch_matches_hand_arithmetic():
    # One program per SM (132 row tiles, one column tile), fp32 FMAs over a long K: compute-bound.
    launch = GemmLaunch(128, 132, 128, 8192, "fp32", 4, 4, 0, efficiency=1.0)
    cost = config_cost(cfg(8, 3, 128, 64), launch, H100_SXM)
    flops_per_clock = 256  # sm_90 CUDA cores
    step = max(2 * 128 * 128 * 64 / flops_per_clock, (128 * 64 + 64 * 128) * 4 / 128)  # 8192 vs 512 clocks
    expected = 128 * step / H100_SXM.clock_hz + KERNEL_OVERHEAD_S  # 128 K steps
    assert cost.programs == 132 and cost.bound == "compute"
    assert cost.seconds == pytest.approx(expected, rel=1e-9)


def test_one_program_more_than_the_sms_hold_costs_a_second_round():
    c = cfg(8, 3, 128, 64)

    def seconds(row_tiles: int) -> float:
        return config_cost(c, GemmLaunch(128, row_tiles, 128, 8192, "fp32", 4, 4, 0), H100_SXM).seconds

    resident = config_cost(c, GemmLaunch(128, 132, 128, 8192, "fp32", 4, 4, 0), H100_SXM).resident
    exact, over = seconds(132 * resident), seconds(132 * resident + 1)
    # The busiest SM runs resident + 1 programs instead of resident.
    assert over - KERNEL_OVERHEAD_S == pytest.approx((exact - KERNEL_OVERHEAD_S) * (resident + 1) / resident, rel=1e-6)


def test_reading_w0_once_per_member_is_l2_bound_and_n_times_slower_at_decode():
    # Llama-7B q_proj at decode, 16 members x 1 row: one 16-row tile per member reads W0 16 times;
    # one tile spanning the members reads it once (the DRAM floor then bounds it).
    per_member = fused_launch(16, 1, 4096, 4096, 16, block_m=16, row_tiles=16)
    one_tile = fused_launch(16, 1, 4096, 4096, 16, block_m=16, row_tiles=1)
    c = cfg(8, 3, 128, 64)
    a, b = config_cost(c, per_member, H100_SXM), config_cost(c, one_tile, H100_SXM)
    assert a.bound == "L2" and b.bound in ("DRAM", "latency")
    assert a.seconds > 4 * b.seconds


def test_split_k_fills_the_sms_at_decode_and_is_not_used_where_tiles_fill_them():
    """Llama-7B q_proj at decode: one 16-row tile x 32 column tiles leave 100 of 132 SMs idle; the
    policy splits K in 4 ranges (128 programs), which the launch model prices as 4x the programs over a
    quarter of K each, plus every range's fp32 sums written and read back: faster, W0 still read once.
    At 16 rows a member (4 tiles x 32 = 128 programs) nothing is split."""
    from lora_ensemble.kernels.launch_costs import stacked_launch
    from lora_ensemble.kernels.launch_policy import with_k_splits

    tiling = stacked_tiling(1, 16, 16)
    split = with_k_splits(tiling, 1, 16, 4096, 4096, H100_SXM.sm_count)
    assert (tiling.k_splits, split.k_splits) == (1, 4)
    whole, quarters = (stacked_launch(16, 1, 4096, 4096, 16, 16, t, "tf32", 2) for t in (tiling, split))
    assert (quarters.row_tiles, quarters.inner) == (4 * whole.row_tiles, 1024)
    assert quarters.dram_bytes - whole.dram_bytes == 2 * 4 * 4 * 16 * (4096 + 16)
    c = cfg(8, 3, 128, 64)
    assert config_cost(c, quarters, H100_SXM).seconds < 0.8 * config_cost(c, whole, H100_SXM).seconds
    assert with_k_splits(stacked_tiling(16, 16, 16), 16, 16, 4096, 4096, H100_SXM.sm_count).k_splits == 1


def test_decode_splits_k_on_the_split_kernels_own_candidates():
    """The split-K kernel's candidates are 8-warp configs of one column tile each, with 128 x 32 on 4
    stages, which its ranges' extra registers leave unspilled at decode's tiling under both Triton
    versions where 128 x 64 spills under triton 3.8 (the record): Llama-7B q_proj decode on an H100
    runs the split kernel there with 128 x 32, by the model faster than the unsplit tiling's best."""
    import torch

    from lora_ensemble.kernels.fused_lora_gemm import fused_tiling
    from lora_ensemble.kernels.launch_costs import stacked_launch

    split_list = list(configs.FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS)
    assert all(c.num_warps == 8 and configs.column_group(c) == 1 for c in split_list)
    tiling, kept, launch = fused_tiling(list(configs.FUSED_LORA_GEMM_GPU_CONFIGS), False, 1, 16, 4096, 4096, 16,
                                        torch.bfloat16, "tf32", H100_SXM, H100_SXM.sm_count,
                                        split_k_configs=split_list)
    assert tiling.k_splits == 4 and all(c in split_list for c in kept)
    first = best_configs(kept, launch, H100_SXM)[0]
    assert (first.kwargs["BLOCK_N"], first.kwargs["BLOCK_K"], first.num_stages) == (128, 32, 4)
    unsplit = tiling._replace(k_splits=1)
    unsplit_kept = configs.fitting_fused_lora_gemm_configs(
        list(configs.FUSED_LORA_GEMM_GPU_CONFIGS),
        configs.FusedProblem(4096, 4096, "bf16", "tf32", 16, H100_SXM.shared_memory_per_program, 90), unsplit)
    whole = stacked_launch(16, 1, 4096, 4096, 16, 16, unsplit, "tf32", 2)
    assert (config_cost(first, launch, H100_SXM).seconds
            < min(config_cost(c, whole, H100_SXM).seconds for c in unsplit_kept))


def test_stages_hide_latency_where_it_bounds():
    launch = fused_launch(16, 1, 4096, 4096, 16, block_m=16, row_tiles=1)  # 32 programs: latency-bound
    two, four = config_cost(cfg(4, 2, 128, 32), launch, H100_SXM), config_cost(cfg(4, 4, 128, 32), launch, H100_SXM)
    assert two.bound == "latency"
    assert four.seconds < two.seconds


def test_tf32x3_triples_compute_bound_time():
    one = GemmLaunch(128, 132, 128, 8192, "tf32", 4, 4, 0, efficiency=0.1)
    three = GemmLaunch(128, 132, 128, 8192, "tf32x3", 4, 4, 0, efficiency=0.1)
    c = cfg(8, 3, 128, 32)
    t1, t3 = config_cost(c, one, H100_SXM), config_cost(c, three, H100_SXM)
    assert t1.bound == "compute" and t3.bound == "compute"
    assert t3.seconds - KERNEL_OVERHEAD_S == pytest.approx(3 * (t1.seconds - KERNEL_OVERHEAD_S), rel=1e-6)


def test_config_beyond_shared_memory_is_infinite():
    launch = GemmLaunch(128, 10, 4096, 4096, "16bit", 4, 4, 0)
    cost = config_cost(cfg(8, 8, 256, 128), launch, H100_SXM)  # 8 x (128 + 256) x 128 x 4 B = 1.5 MB
    assert math.isinf(cost.seconds) and cost.bound == "shared memory per program"


def test_rank_is_sorted_stable_and_best_keeps_at_most_three():
    launch = fused_launch(16, 50, 768, 768, 16, block_m=64, row_tiles=16)
    candidates = list(configs.FUSED_LORA_GEMM_GPU_CONFIGS)
    ranked = rank_configs(candidates, launch, H100_SXM)
    seconds = [cost.seconds for _, cost in ranked]
    assert seconds == sorted(seconds) and len(ranked) == len(candidates)
    tied = [c for c, cost in ranked if cost.seconds == ranked[0][1].seconds]
    assert tied == [c for c in candidates if c in tied]  # ties keep the list's order
    best = best_configs(candidates, launch, H100_SXM)
    assert best == [c for c, _ in ranked[:3]]
    assert best_configs(candidates, launch, H100_SXM, keep=0) == [ranked[0][0]]
    assert best_configs(candidates[:1], launch, H100_SXM) == candidates[:1]


def test_few_row_tiles_prefer_narrow_columns_and_large_batches_large_tiles():
    # 4 row tiles, compute-bound: 256-wide column tiles make 12 programs for 132 SMs, 64-wide ones 48.
    few = GemmLaunch(128, 4, 768, 4096, "fp32", 4, 4, 0)
    first = best_configs(list(configs.FUSED_LORA_GEMM_GPU_CONFIGS), few, H100_SXM)[0]
    assert first.kwargs["BLOCK_N"] <= 64
    # Llama prefill (16 x 512 rows, 128-row member tiles), among the configs the pruning keeps there:
    # the 128 x 128 tile on 8 warps comes first.
    prefill = fused_launch(16, 512, 4096, 4096, 16, block_m=128, row_tiles=64)
    kept = configs.fitting_fused_lora_gemm_configs(
        list(configs.FUSED_LORA_GEMM_GPU_CONFIGS),
        configs.FusedProblem(4096, 4096, "bf16", "tf32", 16, H100_SXM.shared_memory_per_program, 90),
        stacked_tiling(512, 16, 16))
    first = best_configs(kept, prefill, H100_SXM)[0]
    assert (first.kwargs["BLOCK_N"], first.num_warps) == (128, 8)


def test_weight_gradient_launch_names_its_own_tiles():
    grads = GemmLaunch(16, 16, 768 + 768, 1600, "16bit", 4, 2, 0, dot_passes=2, col_tile="BLOCK_C",
                       inner_tile="BLOCK_M")
    ranked = rank_configs(list(configs.LORA_GRADS_GPU_CONFIGS), grads, H100_SXM)
    assert all(math.isfinite(cost.seconds) for _, cost in ranked)
    assert ranked[0][1].programs == 16 * math.ceil(1536 / ranked[0][0].kwargs["BLOCK_C"])


def grouped(warps: int, stages: int, n: int, k: int, col_tiles: int) -> SimpleNamespace:
    return SimpleNamespace(kwargs={"BLOCK_N": n, "BLOCK_K": k, "COL_TILES": col_tiles}, num_warps=warps,
                           num_stages=stages)


def test_column_group_computes_the_rank_block_once_for_its_tiles():
    # Compute-bound (CUDA-core fp32 dots): a group of 2 runs half the programs, each with the base dot
    # of both tiles but the rank block's dot once, so the launch does exactly the rank work it saves
    # less: (2 * 128 + 64) against 2 * (128 + 64) columns of dot work per K step and program pair.
    launch = GemmLaunch(128, 264, 256, 8192, "fp32", 4, 4, 0, rank_tile=64, efficiency=1.0)
    one, two = config_cost(cfg(8, 3, 128, 32), launch, H100_SXM), config_cost(grouped(8, 3, 128, 32, 2), launch,
                                                                              H100_SXM)
    assert (one.programs, two.programs) == (528, 264)
    assert one.bound == two.bound == "compute"
    assert (two.seconds - KERNEL_OVERHEAD_S) / (one.seconds - KERNEL_OVERHEAD_S) == pytest.approx(
        (2 * 128 + 64) / (2 * (128 + 64)), rel=1e-6)
    # Without a rank block a group only makes fewer, longer programs: the same compute-bound time.
    plain = GemmLaunch(128, 264, 256, 8192, "fp32", 4, 4, 0, efficiency=1.0)
    assert config_cost(grouped(8, 3, 128, 64, 2), plain, H100_SXM).seconds == pytest.approx(
        config_cost(cfg(8, 3, 128, 64), plain, H100_SXM).seconds, rel=1e-6)


def test_column_groups_pay_at_prefill_and_not_where_sms_would_idle():
    # Llama-7B q_proj prefill: 16 members x 512 rows in 128-row member tiles (64 row tiles), rank tile 64.
    prefill = fused_launch(16, 512, 4096, 4096, 64, block_m=128, row_tiles=64)
    assert (config_cost(grouped(8, 3, 128, 64, 2), prefill, H100_SXM).seconds
            < config_cost(cfg(8, 3, 128, 64), prefill, H100_SXM).seconds)
    # One 16-row tile (decode): 32 programs of 128 columns on 132 SMs; groups of 2 would leave 116 idle.
    decode = fused_launch(16, 1, 4096, 4096, 16, block_m=16, row_tiles=1)
    assert (config_cost(grouped(8, 3, 128, 64, 2), decode, H100_SXM).seconds
            > config_cost(cfg(8, 3, 128, 64), decode, H100_SXM).seconds)


def test_pruning_keeps_column_groups_only_for_one_pass_stacked_tilings_of_whole_groups():
    group = next(c for c in configs.FUSED_LORA_GEMM_GPU_CONFIGS if configs.column_group(c) > 1)
    one_pass, further_passes = stacked_tiling(512, 16, 16), stacked_tiling(1, 16, 16)
    assert not one_pass.multi_pass and further_passes.multi_pass

    def kept(tiling, cols=4096, precision="tf32", sum_members=None) -> bool:
        problem = configs.FusedProblem(cols, 4096, "fp16", precision, 16, H100_SXM.shared_memory_per_program, 90,
                                       sum_members=sum_members)
        return group in configs.fitting_fused_lora_gemm_configs([group], problem, tiling,
                                                                without_measured_spills=False)

    assert kept(one_pass)
    assert not kept(further_passes)  # the group keeps one pass's rank block
    assert not kept(one_pass, precision="tf32x3")
    assert not kept(one_pass, cols=3 * group.kwargs["BLOCK_N"])  # 3 column tiles: no whole groups
    assert kept(one_pass, cols=4 * group.kwargs["BLOCK_N"] - 5)  # 4 tiles, the last one partial
    assert not kept(one_pass, sum_members=False)  # the shared-input kernel has no groups
