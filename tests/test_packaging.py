"""The package layout: our Triton kernels are only ever ``lora_ensemble.kernels``; a top-level ``import
kernels`` is Hugging Face's package (required by transformers >= 5.2x) wherever Python runs, the repository
root included, in an editable install, a wheel and the source tree alike."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _hf_kernels_init() -> Path | None:
    """``kernels/__init__.py`` of Hugging Face's installed distribution ``kernels``, or None."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_top_level_kernels_folder_is_no_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes `import kernels` from the repository root find our folder, not Hugging Face's")
    assert (ROOT / "lora_ensemble" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_from_the_repository_root_is_hugging_faces():
    found = _run_from_root("import kernels; print(getattr(kernels, '__file__', None))")
    hf_init = _hf_kernels_init()
    if hf_init is None:  # not installed: at most an empty namespace of our folder, never our code
        assert found == "None", found
        pytest.skip("Hugging Face's `kernels` is not installed here; only the absence of ours was checked")
    assert Path(found).resolve() == hf_init


def test_peft_and_transformers_import_from_the_repository_root():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    code = ("import peft, transformers, lora_ensemble.backend_triton, sys; "
            "from transformers.integrations import hub_kernels; "
            "mod = sys.modules['lora_ensemble.kernels.fused_lora_gemm']; print(mod.__file__)")
    found = _run_from_root(code)
    assert Path(found).resolve() == (ROOT / "kernels" / "fused_lora_gemm.py").resolve()


@pytest.mark.slow
def test_wheel_ships_the_kernels_inside_lora_ensemble_only(tmp_path):
    """A wheel built from a copy of the tracked tree holds ``lora_ensemble/kernels/*.py`` and no top-level
    ``kernels``."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    src = tmp_path / "src"
    for rel in tracked.split():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            os.symlink(os.readlink(ROOT / rel), target)
        else:
            shutil.copy2(ROOT / rel, target)
    env = dict(os.environ, LORA_ENSEMBLE_SKIP_CUDA_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], env=env, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("lora_ensemble-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("lora_ensemble/kernels/")) == kernel_files
    assert not [n for n in names if n.startswith("kernels/")], names
