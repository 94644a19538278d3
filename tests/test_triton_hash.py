"""Triton's once-a-process cache key hashed on a thread as soon as a layer's factors are on a CUDA
device, or on the CPU of a machine where NVML sees a GPU (lora_ensemble/triton_hash.py), and the
launchers' first launch of a key waiting for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsembleOverBase, modules, triton_hash
from lora_ensemble.kernels import fused_lora_gemm

ROOT = Path(__file__).resolve().parents[1]

# A new process (Triton's key not yet computed) in which NVML sees sys.argv[3] GPUs (-1: NVML cannot
# tell): start_hashing asks nothing of CUDA, so a CUDA device can be named on this CPU machine.
SCRIPT = r"""
import json, sys
import torch
torch.cuda._device_count_nvml = lambda: int(sys.argv[3])
from triton.runtime.cache import triton_key
from lora_ensemble import triton_hash

backend, device = sys.argv[1], torch.device(sys.argv[2])
report = {"before": triton_key.cache_info().currsize}
triton_hash.start_hashing(backend, device)
first = triton_hash._thread
report["thread"] = first is not None
triton_hash.start_hashing(backend, device)
report["one_thread"] = triton_hash._thread is first
report["cuda_initialized"] = torch.cuda.is_initialized()
triton_hash.wait_for_hash()
report["cached"] = triton_key.cache_info().currsize
hits = triton_key.cache_info().hits
triton_key()
report["hit"] = triton_key.cache_info().hits == hits + 1
print(json.dumps(report))
"""


def _run(backend: str, device: str, gpus_seen_by_nvml: int = -1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT, backend, device, str(gpus_seen_by_nvml)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("backend", "device", "gpus_seen_by_nvml"),
                         [("auto", "cuda:0", -1), ("triton", "cuda:0", 0), ("auto", "cpu", 1), ("triton", "cpu", 2)])
def test_factors_on_a_gpu_or_on_the_cpu_beside_one_start_hashing_once_and_fill_tritons_cache(backend, device,
                                                                                               gpus_seen_by_nvml):
    report = _run(backend, device, gpus_seen_by_nvml)
    assert report["before"] == 0 and report["thread"] and report["one_thread"], report
    assert not report["cuda_initialized"], report  # nothing asked of CUDA: no fork poisoned
    # The key is Triton's own cached value: the next call of triton_key() is a hit, not a second hash.
    assert report["cached"] == 1 and report["hit"], report


@pytest.mark.parametrize(("backend", "device", "gpus_seen_by_nvml"),
                         [("torch", "cuda:0", 1), ("torch", "cpu", 1), ("auto", "cpu", 0), ("auto", "cpu", -1),
                          ("triton", "meta", 1)])
def test_no_thread_for_the_composite_or_without_a_gpu(backend, device, gpus_seen_by_nvml):
    report = _run(backend, device, gpus_seen_by_nvml)
    assert not report["thread"] and report["cached"] == 0, report


@pytest.fixture
def not_started(monkeypatch):
    monkeypatch.setattr(triton_hash, "_started", False)
    monkeypatch.setattr(triton_hash, "_thread", None)


def test_no_thread_under_the_interpreter(not_started, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_hash.start_hashing("triton", torch.device("cuda"))
    assert triton_hash._thread is None


def test_a_failing_hash_is_left_to_tritons_own_call(not_started, monkeypatch):
    import triton.runtime.cache

    calls, reported = [], []

    def failing() -> str:
        calls.append(1)
        raise OSError("libtriton unreadable")

    monkeypatch.setattr(triton.runtime.cache, "triton_key", failing)
    monkeypatch.setattr(threading, "excepthook", reported.append)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    triton_hash.start_hashing("triton", torch.device("cuda"))
    triton_hash.wait_for_hash()
    assert calls == [1] and not reported  # nothing printed from the thread; the first compile raises it


def test_each_way_a_layers_factors_are_placed_reports_their_device(monkeypatch):
    placed = []
    monkeypatch.setattr(modules, "start_hashing", lambda backend, device: placed.append((backend, device.type)))
    layer = FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="triton")
    assert placed == [("triton", "cpu")]
    FusedLoRAEnsembleLinear.from_linear(nn.Linear(12, 10), num_members=3, rank=2)
    assert placed[1:] == [("auto", "meta"), ("auto", "cpu")]  # built on meta, then on the wrapped layer's device
    LoRAEnsembleOverBase(nn.Linear(12, 10), num_members=3, rank=2, backend="torch")
    assert placed[-1] == ("torch", "cpu")
    del placed[:]
    layer.double()  # .to / .cuda / .half: after the move
    assert placed == [("triton", "cpu")] and layer.lora_A.dtype == torch.float64


def test_a_keys_first_launch_waits_for_the_hash_and_later_launches_do_not(not_started, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ENSEMBLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_lora_gemm._STACKED, "bound", {})
    monkeypatch.setattr(fused_lora_gemm._STACKED, "tunings", {})
    joins = []
    monkeypatch.setattr(triton_hash, "_thread", type("Thread", (), {"join": lambda self: joins.append(1),
                                                               "is_alive": lambda self: True})())
    layer = FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="triton")
    x = torch.randn(3, 4, 12)
    layer(x)
    assert joins == [1]
    layer(x)  # the bound launch: no wait
    assert joins == [1]


def test_the_wait_is_counted(not_started, monkeypatch):
    monkeypatch.setattr(triton_hash, "_waited_s", 0.0)
    release = threading.Event()
    monkeypatch.setattr(triton_hash, "_thread", threading.Thread(target=release.wait))
    triton_hash._thread.start()
    threading.Timer(0.05, release.set).start()
    triton_hash.wait_for_hash()
    waited = triton_hash.hash_wait_s()
    assert waited >= 0.04
    triton_hash.wait_for_hash()  # the thread is done: nothing more
    assert triton_hash.hash_wait_s() == waited


GPU_SCRIPT = r"""
import json
import torch
from torch import nn
from triton.runtime.cache import triton_key
from lora_ensemble import FusedLoRAEnsembleLinear, triton_hash

report = {"before": triton_key.cache_info().currsize, "nvml": torch.cuda._device_count_nvml() > 0}
layer = FusedLoRAEnsembleLinear.from_linear(nn.Linear(64, 48), num_members=3, rank=4)  # on the CPU
report["cpu_thread"] = triton_hash._thread is not None
report["cuda_initialized"] = torch.cuda.is_initialized()
layer.cuda()
report["cuda_thread"] = triton_hash._thread is not None
out = layer(torch.randn(3, 5, 64, device="cuda"))
report["finite"] = bool(out.isfinite().all())
report["cached"] = triton_key.cache_info().currsize
print(json.dumps(report))
"""


@pytest.mark.gpu
def test_on_a_gpu_a_layer_wrapped_on_the_cpu_starts_the_hash_and_its_first_call_uses_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Wrapped on the CPU: started there where NVML sees the GPU (CUDA still untouched), else at the move.
    assert report["cpu_thread"] == report["nvml"] and not report["cuda_initialized"], report
    assert report["before"] == 0 and report["cuda_thread"] and report["finite"] and report["cached"] == 1, report
