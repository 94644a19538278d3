"""The per-machine tuning store: one JSON file per device name and software stack, read once, written
atomically with other processes' entries merged, a damaged file ignored with a warning."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

from lora_ensemble import tuning_store as ts


def store(folder: Path, device: str = "NVIDIA H100 80GB HBM3") -> ts.TuningStore:
    return ts.TuningStore(folder / ts.store_file_name(device, "2.14.1+cu130", "3.8.0"), device, "2.14.1+cu130",
                          "3.8.0")


def test_file_name_and_folder(monkeypatch, tmp_path):
    assert ts.store_file_name("NVIDIA H100 80GB HBM3", "2.14.1+cu130", "3.8.0") == \
        "tuning-NVIDIA-H100-80GB-HBM3-torch2.14.1-cu130-triton3.8.0.json"
    monkeypatch.setenv(ts.CACHE_DIR_VARIABLE, str(tmp_path / "here"))
    assert ts.cache_dir() == tmp_path / "here"
    monkeypatch.setenv(ts.CACHE_DIR_VARIABLE, "")
    assert ts.cache_dir() is None
    monkeypatch.delenv(ts.CACHE_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ts.cache_dir() == tmp_path / "xdg" / "lora_ensemble"


def test_results_survive_a_new_process_and_the_file_is_read_once(tmp_path):
    first = store(tmp_path)
    first.record_triton_config("fused", "(768, 768, 'torch.bfloat16')", {"BLOCK_N": 128, "BLOCK_K": 64}, 8, 3,
                               {"8w3s128x64": 12.5, "4w4s64x64": 14.0})
    first.record_auto_choice("linear bfloat16 N16 M64 d768 k768 r8 stacked fwd", "triton", {"torch": 20.0,
                                                                                         "triton": 9.0})
    second = store(tmp_path)  # what a new process sees
    assert second.triton_config("fused", "(768, 768, 'torch.bfloat16')") == {
        "kwargs": {"BLOCK_N": 128, "BLOCK_K": 64}, "num_warps": 8, "num_stages": 3,
        "timings_us": {"8w3s128x64": 12.5, "4w4s64x64": 14.0}}
    assert second.auto_choice("linear bfloat16 N16 M64 d768 k768 r8 stacked fwd")["backend"] == "triton"
    assert second.auto_choice("another class") is None and second.triton_config("fused", "other key") is None
    second.path.write_text("{}")  # read once: later changes to the file are not looked at
    assert second.auto_choice("linear bfloat16 N16 M64 d768 k768 r8 stacked fwd")["backend"] == "triton"


def test_writes_merge_what_another_process_wrote_meanwhile(tmp_path):
    a, b = store(tmp_path), store(tmp_path)
    assert a.auto_choice("x") is None and b.auto_choice("y") is None  # both read the (absent) file
    a.record_auto_choice("x", "torch", {"torch": 1.0})
    b.record_auto_choice("y", "cuda", {"cuda": 2.0})
    data = json.loads(a.path.read_text())
    assert set(data["auto"]) == {"x", "y"}
    assert (data["format"], data["device"], data["torch"], data["triton"]) == (
        ts.FORMAT, "NVIDIA H100 80GB HBM3", "2.14.1+cu130", "3.8.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.path.name, a.path.name + ".lock"]  # no temporary


def _record_many(folder: str, worker: int) -> None:
    s = store(Path(folder))
    for i in range(20):
        s.record_auto_choice(f"w{worker} c{i}", "torch", {"torch": float(i)})


def test_concurrent_writers_never_leave_a_damaged_file(tmp_path):
    context = multiprocessing.get_context("fork")  # the writers touch no torch state
    workers = [context.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    data = json.loads(store(tmp_path).path.read_text())  # parses: every replace was whole
    assert set(data["auto"]) == {f"w{w} c{i}" for w in range(3) for i in range(20)}  # no entry lost


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 99}', "\x00\xff",
                                     '{"format": 1, "device": "another GPU", "torch": "2.14.1+cu130", '
                                     '"triton": "3.8.0", "triton_configs": {}, "auto": {}}',
                                     '{"format": 1, "device": "NVIDIA H100 80GB HBM3", "torch": "2.14.1+cu130", '
                                     '"triton": "3.8.0", "triton_configs": [], "auto": {}}'])
def test_a_damaged_or_foreign_file_is_ignored_with_a_warning_and_replaced(tmp_path, content):
    s = store(tmp_path)
    s.path.write_bytes(content.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning file"):
        assert s.auto_choice("x") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.record_auto_choice("x", "torch", {"torch": 1.0})  # replaces it, no second warning
    assert store(tmp_path).auto_choice("x") == {"backend": "torch", "times_us": {"torch": 1.0}}


def test_an_unwritable_folder_keeps_results_in_memory_with_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    s = ts.TuningStore(blocker / "sub" / "t.json", "cpu", "t", "t")  # its parent is a file
    with pytest.warns(RuntimeWarning, match="cannot write the tuning file"):
        s.record_auto_choice("x", "torch", {"torch": 1.0})
    assert s.auto_choice("x")["backend"] == "torch" and s.path is None
    s.record_auto_choice("y", "torch", {"torch": 1.0})  # no second warning, no file


def test_no_folder_means_memory_only(monkeypatch, tmp_path):
    monkeypatch.setenv(ts.CACHE_DIR_VARIABLE, "")
    s = ts.tuning_store(torch.device("cpu"))
    assert s.path is None
    s.record_auto_choice("memory only", "torch", {"torch": 1.0})
    assert s.auto_choice("memory only")["backend"] == "torch"
    assert not any(tmp_path.iterdir()) and os.environ[ts.CACHE_DIR_VARIABLE] == ""
