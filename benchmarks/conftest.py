"""pytest-benchmark set-up for ``pytest benchmarks/ --benchmark-only``.

* Collects ``bench_*.py`` files in this directory (``tests/`` keeps ``test_*.py``).
* Writes the device, its peaks, torch, triton, CUDA, the dtype, the load average and the UTC date
  into the JSON's ``machine_info`` (``pytest_benchmark_update_machine_info``).
* Adds each row's time ratios to ``limit`` and ``vmap`` of its group to its ``extra_info``
  (``pytest_benchmark_update_json``; :func:`benchmarks.report.add_ratios`).
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

from .cost_model import device_name, device_peaks
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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    device, dtype = bench_device(), bench_dtype()
    peaks = device_peaks(device, dtype)
    machine_info.update(
        device=device_name(device),
        device_type=device.type,
        dtype=str(dtype).removeprefix("torch."),
        peak_flops_per_s=peaks.flops_per_s,
        peak_bytes_per_s=peaks.bytes_per_s,
        peaks_source=peaks.source,
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
