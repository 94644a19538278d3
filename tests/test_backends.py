"""Backend availability: what ``available_backends`` / ``unavailable_reason`` say, and why."""

from __future__ import annotations

import numpy
import pytest
import torch
import triton

from lora_ensemble import available_backends, backends


@pytest.fixture
def fresh_interpreter_check():
    backends._interpreter_problem.cache_clear()
    yield
    backends._interpreter_problem.cache_clear()


@pytest.mark.parametrize(("triton_version", "numpy_version", "usable"), [
    ("3.6.0", "2.4.0", False),  # triton 3.6's interpreter calls int() on one-element arrays
    ("3.6.0", "2.3.5", True),
    ("3.7.1", "2.4.6", True),
    ("3.8.0", "2.5.2", True),
])
def test_interpreter_with_old_triton_and_new_numpy_is_refused_with_a_reason(
        fresh_interpreter_check, monkeypatch, triton_version, numpy_version, usable):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = backends.unavailable_reason("triton", "cpu")
    if usable:
        assert reason is None
    else:
        assert reason is not None and "numpy<2.4" in reason and numpy_version in reason
        with pytest.raises(RuntimeError, match="numpy<2.4"):
            backends.resolve_backend("triton", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU here")
def test_triton_interpreter_runs_here():
    """The test suite checks the Triton kernels on the CPU: their backend must be usable here (a
    skipped backend would silently drop every Triton test)."""
    assert "triton" in available_backends("cpu"), backends.unavailable_reason("triton", "cpu")
