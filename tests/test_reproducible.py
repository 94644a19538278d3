"""Reproducibility across processes: with tuning pinned (``LORA_ENSEMBLE_TRITON_AUTOTUNE=0``) or under
``torch.use_deterministic_algorithms(True)``, two new processes on the same machine compute bitwise the
same outputs and gradients, for the composite, the Triton kernels (under the interpreter here) and
``auto`` choosing between them per shape (by the cost model: nothing is timed, nothing stored is read).
The second process shares the first one's tuning folder, so what the first stored cannot leak in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ensemble import backends

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import hashlib, os
import torch
from lora_ensemble import auto_backend, backends, fused_lora_ensemble_linear, lora_ensemble_delta


def candidates(device, dtype):  # auto on the CPU: the Triton interpreter next to the composite
    return ("triton", "torch") if dtype in backends.FUSED_DTYPES else ("torch",)


backends.auto_candidates = auto_backend.auto_candidates = candidates
for mode in ("pin", "deterministic"):  # each pinned in its own way, auto's per-process state cleared
    os.environ["LORA_ENSEMBLE_TRITON_AUTOTUNE"] = "0" if mode == "pin" else "1"
    torch.use_deterministic_algorithms(mode == "deterministic")
    auto_backend._CHOICES.clear()
    auto_backend._DECISIONS.clear()
    for backend in ("torch", "triton", "auto"):
        for shared in (False, True):
            for n, m, d, k, r in ((3, 5, 24, 20, 3), (2, 40, 36, 52, 8)):
                g = torch.Generator().manual_seed(n * 1000 + m)
                x = torch.randn(m if shared else n * m, d, generator=g).requires_grad_()
                w, b = torch.randn(k, d, generator=g) / d**0.5, torch.randn(k, generator=g)
                a = (torch.randn(n, r, d, generator=g) / d**0.5).requires_grad_()
                bb = torch.randn(n, k, r, generator=g).requires_grad_()
                base = torch.randn(m if shared else n * m, k, generator=g).requires_grad_()
                out = fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, shared_input=shared, backend=backend)
                grads = torch.autograd.grad(out, (x, a, bb), torch.randn(out.shape, generator=g))
                delta = lora_ensemble_delta(x, base, a, bb, 0.5, shared_input=shared, backend=backend)
                digest = hashlib.sha256()
                for t in (out, *grads, delta):
                    digest.update(t.detach().contiguous().numpy().tobytes())
                print(mode, backend, shared, n, m, digest.hexdigest())
    print(mode, "auto chose", sorted({(d.shape.key(), d.backend, d.source) for d in auto_backend.auto_decisions()}))
"""


def run(cache: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "LORA_ENSEMBLE_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif("triton" not in backends.available_backends("cpu"), reason="needs the Triton interpreter")
def test_new_processes_compute_the_same_bits(tmp_path):
    first, second = run(tmp_path), run(tmp_path)
    lines = first.splitlines()
    assert len(lines) == 2 * (3 * 2 * 2 + 1)
    for mode in ("pin", "deterministic"):
        digests = [line for line in lines if line.startswith(mode) and "auto chose" not in line]
        assert len(digests) == 12 and all(len(line.split()[-1]) == 64 for line in digests)
        (chose,) = [line for line in lines if line.startswith(f"{mode} auto chose")]
        assert "'model')" in chose and "measured" not in chose  # auto decided by the model alone
    assert first == second
