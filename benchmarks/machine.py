"""What a benchmark JSON records about the machine: the device's name and identity, and a GPU's
state (clocks, temperature, power, throttling) from ``nvidia-smi``."""

from __future__ import annotations

import shutil
import subprocess

import torch

__all__ = ["GPU_STATE_FIELDS", "device_name", "device_uuid", "gpu_state", "parse_nvidia_smi_csv"]

# nvidia-smi --query-gpu fields (long-standing ones only: one unknown field fails the whole query):
# identity, performance state, clocks now and at most, temperature, power.
GPU_STATE_FIELDS: tuple[str, ...] = (
    "uuid", "name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "temperature.gpu",
    "power.draw", "power.limit",
)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID as nvidia-smi writes it (``GPU-...``), or None (CPU, or not reported)."""
    if device.type != "cuda":
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else None


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = GPU_STATE_FIELDS) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=<fields> --format=csv,noheader`` as dicts, values stripped."""
    rows = []
    for line in text.strip().splitlines():
        values = [value.strip() for value in line.split(",")]
        if len(values) == len(fields):
            rows.append(dict(zip(fields, values)))
    return rows


def gpu_state(device: torch.device) -> dict[str, str]:
    """``nvidia-smi``'s view of ``device`` now (:data:`GPU_STATE_FIELDS`), found by its UUID; on a
    CPU, or when nvidia-smi is missing or fails, ``{"error": why}``."""
    if device.type != "cuda":
        return {"error": "not a GPU"}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"error": "nvidia-smi not found"}
    command = [smi, f"--query-gpu={','.join(GPU_STATE_FIELDS)}", "--format=csv,noheader"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"nvidia-smi: {exc}"}
    rows = parse_nvidia_smi_csv(done.stdout)
    uuid = device_uuid(device)
    mine = [row for row in rows if row["uuid"] == uuid]
    if not mine and len(rows) == 1:  # one GPU: it is this one, whatever its UUID reads like
        mine = rows
    if not mine:
        return {"error": f"nvidia-smi rc={done.returncode}, {len(rows)} GPUs, none with UUID {uuid}: "
                         f"{(done.stdout + done.stderr).strip()[:300]}"}
    return mine[0]
