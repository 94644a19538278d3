"""Robustness: random shapes, dtypes and layouts (hypothesis), run-to-run determinism, NaN/Inf
propagation, and no memory growth over 1,000 training steps.

The ``torch`` backend is searched over every dtype; the ``triton`` backend (the CPU interpreter
without a GPU, hence tiny shapes and no bf16 there: bf16 ``tl.dot`` is wrong in the interpreter)
over the dtypes it takes. Every example is checked against the float64 reference, forward and
backward, by :func:`utils.check_against_reference`.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ensemble import FusedLoRAEnsembleLinear, available_backends, fused_lora_ensemble_linear

from .utils import TF32_TOLERANCE, TOLERANCES, check_against_reference, make_inputs

CPU_BACKENDS = available_backends("cpu")
# Every (backend, device) pair that can run here; the CUDA ones carry the gpu mark.
BACKEND_DEVICES = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in CPU_BACKENDS] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
    for b in (available_backends("cuda") if torch.cuda.is_available() else [])
]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def op_cases(draw, dtypes: tuple[torch.dtype, ...], max_dim: int, max_rows: int) -> dict:
    """One call's shape, dtype and layout: ``rows`` per member, optionally split into ``lead`` dims."""
    rows = draw(st.integers(1, max_rows))
    split = draw(st.sampled_from([d for d in range(1, rows + 1) if rows % d == 0]))
    return {
        "num_members": draw(st.integers(1, 4)),
        "rows": rows,
        "d": draw(st.integers(1, max_dim)),
        "k": draw(st.integers(1, max_dim)),
        "rank": draw(st.integers(1, 9)),
        "dtype": draw(st.sampled_from(dtypes)),
        "shared_input": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "noncontiguous": draw(st.booleans()),
        "lead": (split, rows // split) if split > 1 else None,
        "scaling": draw(st.sampled_from([1.0, 0.25, 3.0])),
        "requires_grad": draw(st.sampled_from([("x", "lora_A", "lora_B"), ("x",), ("lora_A", "lora_B"),
                                               ("x", "weight", "bias", "lora_A", "lora_B")])),
    }


def _inputs(case: dict, device: str = "cpu"):
    case = dict(case)
    if not case["bias"]:
        case["requires_grad"] = tuple(n for n in case["requires_grad"] if n != "bias")
    return make_inputs(device=device, **case)


@EXAMPLES
@given(case=op_cases(dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), max_dim=70, max_rows=12))
def test_torch_backend_random_cases_match_reference(case: dict) -> None:
    check_against_reference(_inputs(case), "torch")


TRITON_DTYPES = (torch.float32, torch.float16) if INTERPRETING else (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.skipif("triton" not in available_backends(TRITON_DEVICE), reason="triton backend unavailable here")
@settings(EXAMPLES, max_examples=12 if INTERPRETING else 50)
@given(case=op_cases(dtypes=TRITON_DTYPES, max_dim=40 if INTERPRETING else 300, max_rows=6 if INTERPRETING else 80))
def test_triton_backend_random_cases_match_reference(case: dict) -> None:
    tol = TF32_TOLERANCE if case["dtype"] == torch.float32 and TRITON_DEVICE == "cuda" else TOLERANCES[case["dtype"]]
    check_against_reference(_inputs(case, TRITON_DEVICE), "triton", tol)


# --- determinism ----------------------------------------------------------------------------------


# What two identical calls reproduce bit for bit. Always: the forward, and the dx of stacked inputs
# (every output element is one program's fp32 sum, in a fixed order). Not by default on a GPU, where
# partial sums meet in fp32 atomics whose order varies from run to run:
#   - the shared-input dx of the ``cuda`` backend, whose members run in groups when the tiles alone
#     leave SMs idle (batch-1 sizes), each group adding its partial sum into dx;
#   - dA and dB of both fused backends, whose reduction over the rows is split into row ranges for
#     long members, each range adding its partial sum.
# The ``torch`` backend (cuBLAS on one stream, or the CPU) and the CPU interpreter never do this.
# Under ``torch.use_deterministic_algorithms(True)`` the fused backends run one group and one row
# range, and every result is bitwise repeatable on every device.
def order_dependent(backend: str, device: str, shared_input: bool) -> set[str]:
    """The results of one call that may differ in their last bits between identical calls when
    deterministic algorithms are off."""
    if device == "cpu" or backend == "torch":
        return set()
    weight_grads = {"dlora_A", "dlora_B"}
    return (weight_grads | {"dx"}) if backend == "cuda" and shared_input else weight_grads


@pytest.fixture(params=[False, True], ids=["default", "deterministic"])
def deterministic_algorithms(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Runs the test with ``torch.use_deterministic_algorithms`` off, then on (restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    # cuBLAS refuses deterministic mode unless its workspace is pinned (torch backend on a GPU).
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shared_input", [False, True])
def test_forward_and_backward_are_bitwise_repeatable(backend: str, device: str, shared_input: bool,
                                                     deterministic_algorithms: bool) -> None:
    inp = make_inputs(3, 11, 37, 29, 5, device=device, shared_input=shared_input)

    def run() -> dict[str, torch.Tensor]:
        out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                         shared_input=shared_input, backend=backend)
        dx, dA, dB = torch.autograd.grad(out, [inp.x, inp.lora_A, inp.lora_B], torch.ones_like(out))
        return {"out": out.detach(), "dx": dx, "dlora_A": dA, "dlora_B": dB}

    loose = set() if deterministic_algorithms else order_dependent(backend, device, shared_input)
    first = run()
    for _ in range(2):
        for name, again in run().items():
            if name in loose:  # the same sums in another order: equal to rounding
                torch.testing.assert_close(again, first[name], rtol=1e-5, atol=1e-5 * first[name].abs().max().item())
            else:
                assert torch.equal(first[name], again), (
                    f"{name} differs between identical runs ({backend}, {device}, shared_input={shared_input}, "
                    f"deterministic algorithms {'on' if deterministic_algorithms else 'off'})")


# --- NaN / Inf ------------------------------------------------------------------------------------


def _forward(inp, backend: str) -> torch.Tensor:
    return fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                      backend=backend)


# The Triton interpreter computes with numpy, which warns where IEEE arithmetic makes a NaN.
_NUMPY_NAN_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@_NUMPY_NAN_WARNING
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_row_stays_in_its_row(backend: str, device: str, bad: float) -> None:
    num_members, rows = 3, 4
    inp = make_inputs(num_members, rows, 20, 12, 3, device=device, requires_grad=("lora_A", "lora_B"))
    clean = _forward(inp, backend).detach()
    with torch.no_grad():
        inp.x[rows + 2, 5] = bad  # member 1, its row 2
    out = _forward(inp, backend)
    assert not torch.isfinite(out[rows + 2]).any(), "the poisoned row must be non-finite in every column"
    mask = torch.ones(out.shape[0], dtype=torch.bool, device=device)
    mask[rows + 2] = False
    torch.testing.assert_close(out[mask], clean[mask], rtol=0, atol=0)

    dA, dB = torch.autograd.grad(out, [inp.lora_A, inp.lora_B], torch.randn_like(out))
    for name, g in (("dlora_A", dA), ("dlora_B", dB)):
        assert not torch.isfinite(g[1]).all(), f"{name} of member 1 must carry the non-finite value"
        assert torch.isfinite(g[[0, 2]]).all(), f"{name} of members 0 and 2 must stay finite"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_nan_in_one_member_leaves_the_others_exact(backend: str, device: str) -> None:
    inp = make_inputs(3, 5, 16, 10, 2, device=device, requires_grad=())
    clean = _forward(inp, backend).reshape(3, 5, 10)
    inp.lora_B[2, 4, 1] = float("nan")  # member 2, output column 4
    out = _forward(inp, backend).reshape(3, 5, 10)
    assert torch.isnan(out[2, :, 4]).all()
    torch.testing.assert_close(out[:2], clean[:2], rtol=0, atol=0)
    keep = [c for c in range(10) if c != 4]
    torch.testing.assert_close(out[2][:, keep], clean[2][:, keep], rtol=0, atol=0)


@_NUMPY_NAN_WARNING
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_inf_in_grad_out_does_not_crash_backward(backend: str, device: str) -> None:
    inp = make_inputs(2, 3, 8, 6, 2, device=device)
    out = _forward(inp, backend)
    grad_out = torch.randn_like(out)
    grad_out[0, 0] = float("inf")  # member 0
    dx, dA, dB = torch.autograd.grad(out, [inp.x, inp.lora_A, inp.lora_B], grad_out)
    assert not torch.isfinite(dx[0]).all() and torch.isfinite(dx[1:]).all()
    assert not torch.isfinite(dA[0]).all() and torch.isfinite(dA[1]).all()
    assert not torch.isfinite(dB[0]).all() and torch.isfinite(dB[1]).all()


# --- memory ---------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_memory_growth_over_1000_training_steps() -> None:
    # x is 64 KiB: keeping each step's autograd graph alive adds ~60 MiB over the loop (measured).
    layer = FusedLoRAEnsembleLinear(64, 48, 4, 8, backend="torch")
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-4)
    x = torch.randn(4 * 64, 64)

    def steps(count: int) -> None:
        for _ in range(count):
            loss = layer(x.requires_grad_(True)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            x.grad = None

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: thread hand-offs would cost more than the arithmetic
    try:
        steps(100)  # allocator and autograd caches reach their steady state
        gc.collect()
        before = _rss_bytes()
        steps(1000)
        gc.collect()
        growth = _rss_bytes() - before
    finally:
        torch.set_num_threads(threads)
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 steps"
    assert torch.isfinite(layer.lora_A).all()
