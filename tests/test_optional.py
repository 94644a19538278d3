"""Optional dependencies (lora_ensemble._optional): a missing one is an ImportError that says what to
install, simulated here by blocking the package in ``sys.modules``; any other import failure passes
through as it was raised, and the benchmarks report it instead of "not installed"."""

from __future__ import annotations

import importlib
import importlib.abc
import pathlib
import re
import sys

import pytest
import torch

from lora_ensemble._optional import OPTIONAL_PACKAGES, MissingDependencyError, import_failure, optional_dependency

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def block(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` and its submodules impossible to import, as if not installed (until the test ends)."""
    for name in [n for n in sys.modules if n.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


class _Broken(importlib.abc.MetaPathFinder):
    """Importing ``name`` raises what a broken installation raises (here: the old `kernels` name clash)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (<repo>/kernels/__init__.py)")
        return None


def break_install(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Broken(package), *sys.meta_path])


@pytest.mark.parametrize(("module", "package", "distribution", "extra"), [
    ("lora_ensemble.io", "safetensors", "safetensors", "models"),
    ("lora_ensemble.files", "safetensors", "safetensors", "models"),
    ("lora_ensemble.demo", "tqdm", "tqdm", "models"),
    ("lora_ensemble.demo", "sklearn", "scikit-learn", "models"),
    ("lora_ensemble.demo", "matplotlib", "matplotlib", "models"),
])
def test_a_missing_package_says_what_to_install(monkeypatch, module, package, distribution, extra) -> None:
    importlib.import_module(module)  # present and importable with the package
    block(monkeypatch, package)
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(MissingDependencyError) as caught:
        importlib.import_module(module)
    assert caught.value.name == package and isinstance(caught.value, ModuleNotFoundError)
    assert f"needs {distribution}, which is not installed: pip install {distribution} " \
           f"(or lora_ensemble[{extra}])" in str(caught.value)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_reliability_diagram_without_matplotlib_says_what_to_install(monkeypatch) -> None:
    from lora_ensemble.plotting import reliability_diagram

    block(monkeypatch, "matplotlib")
    probs = torch.softmax(torch.randn(20, 3), -1)
    with pytest.raises(MissingDependencyError, match=re.escape("reliability_diagram needs matplotlib, which is not "
                                                               "installed: pip install matplotlib (or lora_ensemble"
                                                               "[models])")):
        reliability_diagram({"model": probs}, torch.randint(0, 3, (20,)))


def test_other_import_errors_pass_through_unchanged() -> None:
    clash = ImportError("cannot import name 'CUDAProperties' from 'kernels'")
    with pytest.raises(ImportError) as caught, optional_dependency("something"):
        raise clash
    assert caught.value is clash
    deeper = ModuleNotFoundError("No module named 'numpy._core'", name="numpy._core")  # not an optional package
    with pytest.raises(ModuleNotFoundError) as caught, optional_dependency("something"):
        raise deeper
    assert caught.value is deeper


def test_import_failure_tells_missing_from_broken(monkeypatch, tmp_path) -> None:
    assert import_failure("torch") is None
    block(monkeypatch, "peft")
    assert import_failure("peft") == "peft is not installed: pip install peft (or lora_ensemble[test])"
    (tmp_path / "needs_a_missing_dependency.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_failure("needs_a_missing_dependency") == (
        "importing needs_a_missing_dependency failed: ModuleNotFoundError: No module named 'no_such_module_anywhere'")
    break_install(monkeypatch, "timm")
    assert import_failure("timm") == ("importing timm failed: ImportError: cannot import name 'CUDAProperties' "
                                      "from 'kernels' (<repo>/kernels/__init__.py)")


def test_the_llm_benchmark_reports_why_peft_cannot_be_imported(monkeypatch) -> None:
    from benchmarks.bench_llm import llm_unavailable_reason

    assert llm_unavailable_reason("ensemble") is None
    break_install(monkeypatch, "peft")
    assert llm_unavailable_reason("peft_sequential") == (
        "importing peft failed: ImportError: cannot import name 'CUDAProperties' from 'kernels' "
        "(<repo>/kernels/__init__.py)")
    monkeypatch.undo()
    block(monkeypatch, "peft")
    assert llm_unavailable_reason("peft_sequential").startswith("peft is not installed: pip install peft")


def test_the_extras_named_are_the_extras_that_install_them() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]

    def installs(extra: str) -> set[str]:
        names = set()
        for requirement in extras[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            inner = re.fullmatch(r"lora_ensemble\[(\w+)\]", requirement)
            names |= installs(inner.group(1)) if inner else {name}
        return names

    for module, (distribution, extra) in OPTIONAL_PACKAGES.items():
        assert distribution.lower() in installs(extra), f"{module}: {distribution} is not in the {extra!r} extra"
