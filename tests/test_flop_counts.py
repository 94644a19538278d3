"""The op's FLOP formulas (lora_ensemble/flop_counts.py): FlopCounterMode counts the registered ops
with them, and they agree with the aten ops the eager torch backend runs and with the benchmarks'
cost model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cost_model import op_cost
from benchmarks.providers import build_op_run, make_step
from benchmarks.shapes import OpShape
from lora_ensemble import fused_lora_ensemble_linear
from lora_ensemble.flop_counts import backward_flops, forward_flops, register_cuda_kernel_formulas

from .utils import make_inputs

N, M, D, K, R = 3, 5, 17, 11, 2


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formulas_match_the_analytic_counts() -> None:
    assert forward_flops((N, M, D), (K, D), (N, R, D), False) == 2 * N * M * D * K + 2 * N * M * R * (D + K)
    assert forward_flops((M, D), (K, D), (N, R, D), True) == 2 * M * D * K + 2 * N * M * R * (D + K)
    assert backward_flops((N, M, K), (K, D), (N, R, D), False, True, True) == (
        2 * N * M * D * K + 4 * N * M * R * (D + K))
    assert backward_flops((N, M, K), (K, D), (N, R, D), False, False, True) == 2 * N * M * R * (D + 2 * K)


@pytest.mark.parametrize("shared_input", [False, True])
def test_flop_counter_counts_the_custom_op_and_its_backward(shared_input: bool) -> None:
    inp = make_inputs(N, M, D, K, R, shared_input=shared_input)
    x = inp.x if shared_input else inp.x.view(N, M, D)
    expected_fwd = forward_flops(x.shape, inp.weight.shape, inp.lora_A.shape, shared_input)
    expected_bwd = backward_flops((N, M, K), inp.weight.shape, inp.lora_A.shape, shared_input, True, True)

    def op() -> torch.Tensor:
        return torch.ops.lora_ensemble.fused_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                                    shared_input, "torch")[0]

    assert _count(op) == expected_fwd
    assert _count(lambda: op().sum().backward()) == expected_fwd + expected_bwd


@pytest.mark.parametrize("shared_input", [False, True])
def test_eager_torch_backend_counts_the_same_through_its_aten_ops(shared_input: bool) -> None:
    inp = make_inputs(N, M, D, K, R, shared_input=shared_input)
    x_shape = (M, D) if shared_input else (N, M, D)
    expected_fwd = forward_flops(x_shape, inp.weight.shape, inp.lora_A.shape, shared_input)
    expected_bwd = backward_flops((N, M, K), inp.weight.shape, inp.lora_A.shape, shared_input, True, True)

    def call() -> torch.Tensor:
        return fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                          shared_input=shared_input, backend="torch")

    assert _count(call) == expected_fwd
    assert _count(lambda: call().sum().backward()) == expected_fwd + expected_bwd


def test_exported_program_is_counted_through_the_op() -> None:
    inp = make_inputs(N, M, D, K, R, requires_grad=())

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused_lora_ensemble_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                              backend="torch")

    program = torch.export.export(Layer(), (inp.x,))
    assert "lora_ensemble.fused_linear" in program.graph_module.code
    assert _count(lambda: program.module()(inp.x)) == forward_flops((N, M, D), inp.weight.shape,
                                                                            inp.lora_A.shape, False)


def test_cuda_kernel_formulas_register_once_the_extension_ops_exist() -> None:
    assert register_cuda_kernel_formulas() == hasattr(torch.ops.lora_ensemble, "cuda_forward")
    assert register_cuda_kernel_formulas() == hasattr(torch.ops.lora_ensemble, "cuda_forward")  # idempotent


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["bmm", "limit"])
def test_benchmark_cost_model_flops_are_what_the_counter_sees(provider: str, mode: str) -> None:
    shape = OpShape("tiny", N, M, D, K, R)
    inp = make_inputs(N, M, D, K, R, scaling=1.0)
    run = build_op_run(provider, inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 1.0)
    step = make_step(run, mode)
    assert _count(step) == op_cost(shape, mode, 4, limit=provider == "limit").flops


@pytest.mark.parametrize("shared_input", [False, True])
def test_flop_counter_counts_the_delta_op_without_the_base_gemm(shared_input: bool) -> None:
    """lora_delta adds the members' update to a given base output: no 2NMdk term forward or backward."""
    inp = make_inputs(N, M, D, K, R, shared_input=shared_input)
    x = inp.x if shared_input else inp.x.view(N, M, D)
    base = torch.randn(*x.shape[:-1], K, requires_grad=True)
    lora_terms = 2 * N * M * R * (D + K)

    def op() -> torch.Tensor:
        return torch.ops.lora_ensemble.lora_delta(x, base, inp.lora_A, inp.lora_B, inp.scaling, shared_input,
                                                  "torch")[0]

    assert _count(op) == lora_terms
    assert _count(lambda: op().sum().backward()) == lora_terms + backward_flops(
        (N, M, K), None, inp.lora_A.shape, shared_input, True, True)
