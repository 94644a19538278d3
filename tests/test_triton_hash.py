"""Triton's once-a-process cache key hashed on a thread from the first layer's construction
(lora_ensemble/triton_hash.py), and the launchers' first launch of a key waiting for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ensemble import FusedLoRAEnsembleLinear, triton_hash
from lora_ensemble.kernels import fused_lora_gemm

ROOT = Path(__file__).resolve().parents[1]

# A new process (Triton's key not yet computed) on a machine whose CUDA is reported available.
SCRIPT = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True
from triton.runtime.cache import triton_key
from lora_ensemble import FusedLoRAEnsembleLinear, triton_hash

report = {"before": triton_key.cache_info().currsize}
FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend=sys.argv[1])
first = triton_hash._thread
report["thread"] = first is not None
FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend=sys.argv[1])
report["one_thread"] = triton_hash._thread is first
triton_hash.wait_for_hash()
report["cached"] = triton_key.cache_info().currsize
hits = triton_key.cache_info().hits
triton_key()
report["hit"] = triton_key.cache_info().hits == hits + 1
print(json.dumps(report))
"""


def _run(backend: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT, backend], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_the_first_layer_starts_hashing_tritons_key_once_and_fills_tritons_cache(backend):
    report = _run(backend)
    assert report["before"] == 0 and report["thread"] and report["one_thread"], report
    # The key is Triton's own cached value: the next call of triton_key() is a hit, not a second hash.
    assert report["cached"] == 1 and report["hit"], report


def test_no_thread_for_the_composite():
    report = _run("torch")
    assert not report["thread"] and report["cached"] == 0, report


@pytest.fixture
def not_started(monkeypatch):
    monkeypatch.setattr(triton_hash, "_started", False)
    monkeypatch.setattr(triton_hash, "_thread", None)


def test_no_thread_under_the_interpreter_or_without_cuda(not_started, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="triton")
    assert triton_hash._thread is None
    monkeypatch.setattr(triton_hash, "_started", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="auto")
    assert triton_hash._thread is None


def test_a_keys_first_launch_waits_for_the_hash_and_later_launches_do_not(not_started, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ENSEMBLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_lora_gemm._STACKED, "bound", {})
    monkeypatch.setattr(fused_lora_gemm._STACKED, "tunings", {})
    joins = []
    monkeypatch.setattr(triton_hash, "_thread", type("Thread", (), {"join": lambda self: joins.append(1)})())
    layer = FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="triton")
    x = torch.randn(3, 4, 12)
    layer(x)
    assert joins == [1]
    layer(x)  # the bound launch: no wait
    assert joins == [1]
