"""The launch policies of the two kernel families, tied together: csrc/cuda/launch_policy.cuh (called
through the host emulation's entry points, compiled from the same header) against
lora_ensemble.kernels.launch_policy, over grids of shapes. Policies meant to agree are compared
value for value; where the kernels legitimately differ the test says how, passing each side its
own tile sizes.
"""

from __future__ import annotations

import importlib

import pytest

from . import cuda_emulation


@pytest.fixture(scope="module")
def cuda_policy():
    return cuda_emulation.emulation_or_skip().dll


@pytest.fixture(scope="module")
def triton_policy():
    try:
        return importlib.import_module("lora_ensemble.kernels.launch_policy")
    except ImportError as exc:
        pytest.skip(f"lora_ensemble.kernels.launch_policy is not on this branch ({exc}); the Triton policies "
                    "land with the Triton half of issue 21")


MEMBERS = (1, 2, 3, 8, 16, 64)
ROWS_PER_MEMBER = (*range(1, 70), 100, 127, 128, 129, 197, 512, 1600)
SM_COUNTS = (1, 46, 108, 132)


def test_rank_tiles_agree(cuda_policy, triton_policy):
    for rank in range(1, 129):
        assert cuda_policy.emu_block_rank(rank) == triton_policy.block_rank(rank), rank


def test_members_a_row_tile_spans_agree(cuda_policy, triton_policy):
    for block_m in (4, 16, 32, 64, 128):
        for n in MEMBERS:
            for m in ROWS_PER_MEMBER:
                want = triton_policy.row_tile_members(m, block_m, n)
                assert cuda_policy.emu_row_tile_members(m, block_m, n) == want, (m, block_m, n)


def test_decode_and_small_batches_take_one_row_tile_in_both(cuda_policy, triton_policy):
    """Both tile the stacked rows as one matrix: at decode (16 x 1 row) and 8 x 2 rows one 16-row tile
    holds every member, and at 16 rows per member (rank 16) 64-row tiles of 4 members. The CUDA
    kernels have 16- and 64-row tiles (``large_tile_members``: the shrink slices a 64-row tile holds,
    4 up to rank tile 32, fused_tile.cuh); Triton's are powers of two up to 128, so they part from 64
    rows per member on (e.g. 512 rows: 64 and 128)."""
    for m, n, want in ((1, 16, 16), (2, 8, 16), (16, 16, 64), (20, 16, 64)):
        assert cuda_policy.emu_stacked_block_rows(m, n, 4) == want, (m, n)
        assert triton_policy.stacked_block_rows(m, n, 16) == want, (m, n)
    assert cuda_policy.emu_stacked_block_rows(512, 16, 4) == 64
    assert triton_policy.stacked_block_rows(512, 16, 16) == 128


def test_shared_input_row_tiles_agree_where_both_have_the_tile(cuda_policy, triton_policy):
    """16 rows where larger output tiles would leave SMs idle (batch 1), else the largest tile. CUDA
    has 16 and 64 only, so below 64 rows it takes 16 where Triton takes the next power of two (only
    with so many output columns that the tiles fill the GPU anyway)."""
    for sms in SM_COUNTS:
        for rows in (1, 7, 16, 50, 63, 64, 65, 197, 512, 1600, 4096, 25600):
            for cols in (8, 96, 768, 4096, 14336):
                cuda = cuda_policy.emu_shared_block_rows(rows, cols, sms)
                triton = triton_policy.shared_block_rows(rows, cols, 16, sms)
                if rows >= 64 or triton == 16:
                    assert cuda == triton, (rows, cols, sms)
                else:
                    assert cuda == 16 and triton > 16, (rows, cols, sms)


def test_split_k_of_the_fused_kernels_agrees(cuda_policy, triton_policy):
    """Both split a fused launch's reduction the same way given the same programs and K step: none
    while the programs fill half the SMs, else as many ranges as keep them within one wave. (Each
    counts its programs with its own row tiles; the column tile is 128 in both.)"""
    assert triton_policy.POLICY_BLOCK_COLS == 128
    for sms in SM_COUNTS:
        for programs in (1, 2, 7, 16, 32, 33, 66, 67, 132, 300):
            for inner in (1, 100, 127, 128, 255, 256, 768, 1000, 4096, 14336):
                for block_k in (16, 32, 64):
                    want = triton_policy.fused_k_splits(programs, inner, block_k, sms)
                    assert cuda_policy.emu_fused_k_splits(programs, inner, block_k, sms) == want, (
                        programs, inner, block_k, sms)
                    per_split = triton_policy.fused_k_per_split(inner, want, block_k)
                    assert want == 1 or (per_split % block_k == 0 and -(-inner // per_split) == want
                                         and (want - 1) * per_split < inner), (programs, inner, block_k, sms)
    assert triton_policy.fused_k_splits(32, 4096, 64, 132) == 4  # Llama q_proj decode: 4 ranges of 1024


def test_weight_gradient_row_splits_agree(cuda_policy, triton_policy):
    for sms in SM_COUNTS:
        for deterministic in (False, True):
            for rows in (1, 511, 512, 1023, 1100, 4096, 25600, 100000):
                for programs in (1, 2, 7, 12, 48, 132, 300):
                    want = triton_policy.grad_row_splits(rows, programs, sms, deterministic)
                    got = cuda_policy.emu_grad_row_splits(rows, programs, sms, int(deterministic))
                    assert got == want, (rows, programs, sms, deterministic)


def test_weight_gradient_row_ranges_agree_given_the_same_quantum(cuda_policy, triton_policy):
    """Each range is an equal share rounded up to the row quantum: the kernels' row step, 32 rows for
    CUDA (BKM) and GRAD_ROW_QUANTUM (16) for Triton; with each its own quantum they differ only there."""
    quantum = triton_policy.GRAD_ROW_QUANTUM
    for rows in (1, 100, 1100, 4096, 25601, 100000):
        for splits in (1, 2, 3, 7, 16):
            want = triton_policy.grad_rows_per_split(rows, splits)
            assert cuda_policy.emu_grad_rows_per_split(rows, splits, quantum) == want, (rows, splits)
            assert cuda_policy.emu_grad_rows_per_split(rows, splits, 32) % 32 == 0
