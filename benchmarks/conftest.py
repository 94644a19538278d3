"""pytest-benchmark set-up for ``pytest benchmarks/ --benchmark-only``.

* Collects ``bench_*.py`` files in this directory (``tests/`` keeps ``test_*.py``).
* Before the first benchmark, records the GPU's state (clocks, temperature, power) and measures the
  device's peaks (:func:`benchmarks.cost_model.device_peaks`, which also warms a GPU up).
* Writes the device (name, UUID, L2 size), its measured peaks and the spec-sheet reference, the GPU
  state at the start and the end, torch, triton, CUDA, the dtype, the providers of each kind, the
  load average and the UTC date into the JSON's ``machine_info``
  (``pytest_benchmark_update_machine_info``).
* Records every benchmark row that was skipped or failed, with the reason, under the JSON's
  ``"missing"`` key (the report prints them as MISSING).
* Adds each row's time ratios to ``limit``, ``vmap`` and ``vmap_paper`` of its group to its
  ``extra_info`` (``pytest_benchmark_update_json``; :func:`benchmarks.report.add_ratios`).
* Lets torch.compile keep one static graph per shape and grad mode for the ``compiled`` provider.
* On a CPU-only machine, runs torch on one thread unless ``OMP_NUM_THREADS`` is set: when other
  jobs share the cores, OpenMP barriers stretch microsecond ops to tens of milliseconds (measured
  on a 2-core machine at load 5: the ``sequential`` forward went from 1.3 ms on one thread to
  630 ms on two). The thread count is part of the device name in the results.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os

import pytest
import torch
import torch._dynamo

import lora_ensemble

from .cost_model import device_peaks, spec_peaks
from .e2e_models import E2E_PROVIDERS
from .machine import device_name, device_uuid, gpu_state
from .measure import flush_bytes, l2_cache_bytes
from .providers import OP_PROVIDERS
from .report import add_ratios
from .shapes import bench_device, bench_dtype

# The default limit (8) would silently fall back to eager after the 8th shape.
torch._dynamo.config.recompile_limit = 64
if bench_device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_GPU_STATE_AT_START: dict[str, str] = {}
_MISSING: list[dict[str, str]] = []  # rows that were skipped or failed: group, provider, outcome, reason


@pytest.fixture(scope="session", autouse=True)
def _measure_device_first() -> None:
    """Before the first benchmark: the GPU's state (idle), then its peaks (which warm it up)."""
    device = bench_device()
    if device.type == "cuda":
        _GPU_STATE_AT_START.update(gpu_state(device))
    device_peaks(device, bench_dtype())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Note a benchmark row that was skipped or failed (its test sets group and provider first)."""
    outcome = yield
    report = outcome.get_result()
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if not (report.skipped or report.failed) or fixture is None or fixture.group is None:
        return
    provider = fixture.extra_info.get("provider")
    if provider is None:
        return
    text = call.excinfo.exconly() if call.excinfo is not None else report.longreprtext
    reason = (text.strip().removeprefix("Skipped: ").splitlines() or ["(no message)"])[0][:300]
    _MISSING.append({"group": fixture.group, "provider": provider, "outcome": report.outcome, "reason": reason,
                     "test": item.nodeid})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    device, dtype = bench_device(), bench_dtype()
    peaks = device_peaks(device, dtype)
    spec = spec_peaks(device, dtype)
    l2 = l2_cache_bytes(device)
    machine_info.update(
        device=device_name(device),
        device_type=device.type,
        device_uuid=device_uuid(device),
        l2_cache_bytes=l2,
        l2_flush_bytes=flush_bytes(l2) if device.type == "cuda" else 0,
        dtype=str(dtype).removeprefix("torch."),
        peak_flops_per_s=peaks.flops_per_s,
        peak_bytes_per_s=peaks.bytes_per_s,
        peaks_source=peaks.source,
        spec_peak_flops_per_s=spec.flops_per_s if spec else None,
        spec_peak_bytes_per_s=spec.bytes_per_s if spec else None,
        spec_source=spec.source if spec else None,
        gpu_state_start=dict(_GPU_STATE_AT_START) or None,
        gpu_state_end=gpu_state(device) if device.type == "cuda" else None,
        providers={"op": list(OP_PROVIDERS), "e2e": list(E2E_PROVIDERS)},
        torch=torch.__version__,
        triton=_version("triton"),
        cuda=torch.version.cuda,
        lora_ensemble=lora_ensemble.__version__,
        fused_backends=[b for b in ("triton", "cuda") if device.type == "cuda"
                        and b in lora_ensemble.available_backends(device)],
        load_average_1_5_15m=list(os.getloadavg()),
        cpu_count=os.cpu_count(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def pytest_benchmark_update_json(config, benchmarks, output_json: dict) -> None:
    add_ratios(output_json["benchmarks"])
    output_json["missing"] = list(_MISSING)
