"""The ``cuda`` backend (hand-written CUDA C++ kernels in csrc/cuda/).

Without a GPU: the compiled extension registers CUDA kernels for its three ops, their schemas and
fake impls pass ``opcheck`` on meta tensors, and importing the package neither loads the extension
nor initialises CUDA. With a GPU (``@pytest.mark.gpu``): every output against the float64 reference
over odd shapes, both layouts, three dtypes and ranks 1..128, the by-products ``xa`` / ``dyb``,
input errors, and CUDA-graph capture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward
from .utils import TOLERANCES, assert_close_named, check_against_reference, make_inputs

OPS = ("cuda_forward", "cuda_backward_dx", "cuda_backward_lora")

_EXTENSION_EXPECTED = torch.version.cuda is not None and os.environ.get("LORA_ENSEMBLE_SKIP_CUDA_BUILD", "0") != "1"
needs_extension = pytest.mark.skipif(not _EXTENSION_EXPECTED,
                                     reason="the CUDA extension is not built (CPU torch or LORA_ENSEMBLE_SKIP_CUDA_BUILD=1)")


@pytest.fixture(scope="module")
def backend_cuda():
    import lora_ensemble.backend_cuda as module

    return module


@needs_extension
def test_ops_have_cuda_kernels(backend_cuda):
    assert backend_cuda.has_cuda_kernels()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ensemble::{op}", "CUDA"), op


def _meta_args(op: str, shared_input: bool, with_bias: bool = True) -> tuple:
    n, m, d, k, r = 3, 7, 24, 10, 5
    t = lambda *s, dtype=torch.float16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    x = t(m, d) if shared_input else t(n, m, d)
    if op == "cuda_forward":
        return (x, t(k, d), t(k) if with_bias else None, t(n, r, d), t(n, k, r), 0.5, shared_input)
    if op == "cuda_backward_dx":
        return (t(n, m, k), t(k, d), t(n, r, d), t(n, k, r), 0.5, shared_input)
    return (t(n, m, k), x, t(n, m, r, dtype=torch.float32), t(n, m, r, dtype=torch.float32), 0.5, shared_input)


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_meta(backend_cuda, op, shared_input):
    args = _meta_args(op, shared_input)
    torch.library.opcheck(getattr(torch.ops.lora_ensemble, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
def test_fake_shapes(backend_cuda, shared_input):
    n, m, d, k, r = 3, 7, 24, 10, 5
    out, xa = torch.ops.lora_ensemble.cuda_forward(*_meta_args("cuda_forward", shared_input, with_bias=False))
    assert (out.shape, out.dtype, xa.shape, xa.dtype) == ((n, m, k), torch.float16, (n, m, r), torch.float32)
    dx, dyb = torch.ops.lora_ensemble.cuda_backward_dx(*_meta_args("cuda_backward_dx", shared_input))
    assert dx.shape == ((m, d) if shared_input else (n, m, d)) and dyb.shape == (n, m, r)
    assert dyb.dtype == torch.float32
    dA, dB = torch.ops.lora_ensemble.cuda_backward_lora(*_meta_args("cuda_backward_lora", shared_input))
    assert (dA.shape, dB.shape, dA.dtype, dB.dtype) == ((n, r, d), (n, k, r), torch.float16, torch.float16)


def test_import_loads_no_extension_and_no_cuda():
    code = (
        "import sys, torch, lora_ensemble\n"
        "print('lora_ensemble._C' in sys.modules, 'lora_ensemble.backend_cuda' in sys.modules, "
        "torch.cuda.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "False", "False"], result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# GPU tests: nothing below runs without a CUDA device.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, rows per member, d, k, rank, lead): tile edges everywhere, d and k both aligned (16-byte
# copies) and misaligned (element fallback), a single row, one member, 3-D inputs.
SHAPES = [
    (3, 37, 72, 100, 8, None),
    (2, 70, 100, 136, 33, (7, 10)),
    (1, 1, 24, 40, 1, None),
    (4, 65, 130, 129, 128, (5, 13)),
    (2, 129, 256, 64, 16, None),
    (1, 33, 8, 300, 64, None),
]


def _ids(shape) -> str:
    n, m, d, k, r, lead = shape
    return f"N{n}-M{m}-d{d}-k{k}-r{r}" + ("-3d" if lead else "")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_against_reference(shape, shared_input, dtype):
    n, m, d, k, r, lead = shape
    inp = make_inputs(n, m, d, k, r, dtype=dtype, device="cuda", shared_input=shared_input, lead=lead)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 8, 33, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_noncontiguous_no_bias(rank, dtype):
    inp = make_inputs(3, 45, 96, 80, rank, dtype=dtype, device="cuda", bias=False, noncontiguous=True, scaling=1.0)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("requires_grad", [("x",), ("lora_A",), ("lora_B",), ("lora_A", "lora_B")])
def test_partial_gradients(requires_grad):
    inp = make_inputs(2, 31, 40, 56, 8, dtype=torch.float16, device="cuda", requires_grad=requires_grad)
    check_against_reference(inp, "cuda")


def _member_rows(inp):
    n, d = inp.lora_A.shape[0], inp.weight.shape[1]
    return inp.x.reshape(-1, d) if inp.shared_input else inp.x.reshape(n, -1, d)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_rank_byproducts(shared_input, dtype):
    """xa = x A^T and dyb = dy B come back in fp32, for every row of every member."""
    import lora_ensemble.backend_cuda as bc

    inp = make_inputs(3, 77, 136, 72, 20, dtype=dtype, device="cuda", shared_input=shared_input, requires_grad=())
    x = _member_rows(inp)
    out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    x64 = x.double() if not shared_input else x.double().expand(3, *x.shape)
    assert xa.dtype == torch.float32
    assert_close_named("xa", xa, x64 @ inp.lora_A.double().transpose(1, 2), dtype)
    dy = torch.randn_like(out)
    dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    assert dyb.dtype == torch.float32
    assert_close_named("dyb", dyb, dy.double() @ inp.lora_B.double(), dtype)


@pytest.mark.gpu
def test_large_members_and_rows():
    """Many row tiles and members; M not a multiple of the tile."""
    inp = make_inputs(16, 197, 192, 192, 8, dtype=torch.bfloat16, device="cuda")
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
def test_nan_propagates_only_to_its_row():
    inp = make_inputs(2, 20, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x = inp.x.clone()
    x[3, 5] = float("inf")
    out = torch.ops.lora_ensemble.cuda_forward(x.reshape(2, 20, 32), inp.weight, inp.bias, inp.lora_A,
                                               inp.lora_B, inp.scaling, False)[0].reshape(40, 24)
    assert not torch.isfinite(out[3]).all()
    assert torch.isfinite(torch.cat([out[:3], out[4:]])).all()


@pytest.mark.gpu
def test_bad_inputs_raise_named_errors():
    inp = make_inputs(2, 8, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x3 = inp.x.reshape(2, 8, 32)
    fwd = torch.ops.lora_ensemble.cuda_forward
    with pytest.raises(RuntimeError, match="lora_B shape"):
        fwd(x3, inp.weight, inp.bias, inp.lora_A, inp.lora_B[:, :-1].contiguous(), 1.0, False)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        fwd(x3, inp.weight.float(), inp.bias, inp.lora_A, inp.lora_B, 1.0, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        fwd(x3.transpose(1, 2).contiguous().transpose(1, 2), inp.weight, inp.bias, inp.lora_A, inp.lora_B, 1.0, False)
    with pytest.raises(RuntimeError, match=r"rank r=129"):
        a, b = torch.zeros(2, 129, 32, device="cuda", dtype=torch.half), torch.zeros(2, 24, 129, device="cuda",
                                                                                      dtype=torch.half)
        fwd(x3, inp.weight, inp.bias, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fwd(x3, inp.weight.cpu(), inp.bias, inp.lora_A, inp.lora_B, 1.0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_cuda_graph_capture(shared_input):
    """The kernels launch on the current stream, so a captured graph replays them on new data."""
    import lora_ensemble.backend_cuda as bc

    inp = make_inputs(3, 50, 64, 48, 8, dtype=torch.float16, device="cuda", shared_input=shared_input,
                      requires_grad=())
    x = _member_rows(inp).clone()
    dy = torch.randn(3, 50, 48, device="cuda", dtype=torch.float16)

    def step():
        out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dA, dB = bc.backward_lora(dy, x, xa, dyb, inp.scaling, shared_input)
        return out, dx, dA, dB

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()

    x_user = x.reshape(-1, 64) if shared_input else x.reshape(-1, 64)
    ref = lora_ensemble_reference(x_user, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    grads = lora_ensemble_reference_backward(dy.reshape(-1, 48), x_user, inp.weight, inp.lora_A, inp.lora_B,
                                             inp.scaling, shared_input)
    tol = TOLERANCES[torch.float16]
    assert_close_named("out", captured[0].reshape(-1, 48), ref, torch.float16, tol)
    assert_close_named("dx", captured[1].reshape(-1, 64), grads.x, torch.float16, tol)
    assert_close_named("dA", captured[2], grads.lora_A, torch.float16, tol)
    assert_close_named("dB", captured[3], grads.lora_B, torch.float16, tol)
