"""A small forward + backward of one fused backend over edge shapes, for compute-sanitizer.

Run under ``compute-sanitizer --tool memcheck`` (or ``racecheck``) with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so that every tensor is its own allocation and an access past
its end is seen instead of landing in a neighbour inside a cached segment::

    python -m benchmarks.sanitize_workload --backend cuda

Shapes: ragged tile edges everywhere (N=3, M=37, d=72, k=100, r=8), d and k not multiples of 8 with
rank 33 (the element-wise fallback and the rank tile of 64), an input at an odd storage offset (not
16-byte aligned), one member with one row at rank 1, rank 128 (the largest tile), a long member
(M=1100 rows: the weight-gradient kernels' row split, and the Triton kernels' member tiles, 9 a
member, the last one's rows wrapping inside the member), decode (16 members of one row each) and 8
members of 3 rows (row tiles that span members straddle their boundaries), 2 members of 130 rows (a
128-row tile straddling both, held in one pass of 2 slots), in both layouts and all
three dtypes; then the delta op (the weightless kernels, over a given base output) on
:data:`DELTA_SHAPES`. Every output and gradient must be finite; a kernel fault or a sanitizer report
fails the run. On the CPU (``--device cpu``, the Triton interpreter) the same workload is a quick
smoke test.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lora_ensemble import fused_lora_ensemble_linear, lora_ensemble_delta

__all__ = ["DELTA_SHAPES", "SHAPES", "main", "run_workload"]

# (label, N, rows per member, d, k, rank, storage offset of x in elements)
SHAPES: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("ragged", 3, 37, 72, 100, 8, 0),
    ("unaligned-rank33", 2, 9, 20, 36, 33, 0),
    ("odd-offset", 2, 33, 130, 72, 64, 3),
    ("one-row", 1, 1, 8, 8, 1, 0),
    ("rank128", 2, 65, 64, 129, 128, 0),
    ("long-member", 2, 1100, 64, 96, 16, 0),
    ("decode", 16, 1, 40, 24, 16, 0),
    ("straddle", 8, 3, 40, 24, 8, 0),
    ("straddle-long", 2, 130, 40, 24, 8, 0),
)
DELTA_SHAPES = tuple(shape for shape in SHAPES if shape[0] in ("ragged", "unaligned-rank33", "decode"))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _operand(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0,
             offset: int = 0) -> torch.Tensor:
    """A random tensor of ``shape`` starting ``offset`` elements into its own allocation."""
    count = 1
    for size in shape:
        count *= size
    storage = torch.randn(count + offset, device=device) * scale
    return storage.to(dtype)[offset:].view(shape)


def run_workload(backend: str, device: torch.device, dtypes: list[torch.dtype]) -> int:
    """Forward + backward of ``backend`` over :data:`SHAPES` and, for the delta op, :data:`DELTA_SHAPES`,
    both layouts, ``dtypes``; returns how many calls ran. Raises AssertionError naming the case when
    an output or gradient is not finite."""
    calls = 0
    for dtype in dtypes:
        for op, shapes in (("linear", SHAPES), ("delta", DELTA_SHAPES)):
            for label, n, m, d, k, r, offset in shapes:
                for shared in (False, True):
                    rows = m if shared else n * m
                    x = _operand(rows, d, device=device, dtype=dtype, offset=offset).requires_grad_()
                    lora_a = _operand(n, r, d, device=device, dtype=dtype, scale=d**-0.5).requires_grad_()
                    lora_b = _operand(n, k, r, device=device, dtype=dtype, scale=r**-0.5).requires_grad_()
                    if op == "linear":
                        weight = _operand(k, d, device=device, dtype=dtype, scale=d**-0.5)
                        bias = _operand(k, device=device, dtype=dtype)
                        out = fused_lora_ensemble_linear(x, weight, bias, lora_a, lora_b, 0.5, shared_input=shared,
                                                         backend=backend)
                    else:
                        base = _operand(rows, k, device=device, dtype=dtype)
                        out = lora_ensemble_delta(x, base, lora_a, lora_b, 0.5, shared_input=shared, backend=backend)
                    grads = torch.autograd.grad(out, (x, lora_a, lora_b), torch.randn_like(out))
                    case = f"{backend} {op} {label} {'shared' if shared else 'stacked'} {dtype}"
                    for name, value in zip(("out", "dx", "dA", "dB"), (out, *grads)):
                        assert torch.isfinite(value).all(), f"{case}: {name} is not finite"
                    calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("cuda", "triton", "torch"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="repeatable; default: all three")
    args = parser.parse_args(argv)
    dtypes = [DTYPES[name] for name in (args.dtype or DTYPES)]
    calls = run_workload(args.backend, torch.device(args.device), dtypes)
    print(f"sanitize workload: {calls} forward + backward calls of backend {args.backend!r}, all finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
