"""Optional dependencies: which package and which extra of ``lora_ensemble`` provide each, and one
error for a missing one.

``pip install lora_ensemble`` installs torch and numpy only. The modules that need more import it
inside :func:`optional_dependency`, so that a missing package is an ``ImportError`` that says what
to install instead of a bare ``No module named 'tqdm'``; any other failure of an import (a broken
installation, a name clash) passes through unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OPTIONAL_PACKAGES", "MissingDependencyError", "import_failure", "optional_dependency"]

# top-level module -> (the distribution pip installs it from, the extra of lora_ensemble that includes it;
# tests/test_optional.py checks these against pyproject.toml)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "safetensors": ("safetensors", "models"),
    "tqdm": ("tqdm", "models"),
    "sklearn": ("scikit-learn", "models"),
    "matplotlib": ("matplotlib", "models"),
    "timm": ("timm", "test"),
    "torchvision": ("torchvision", "test"),
    "transformers": ("transformers", "test"),
    "peft": ("peft", "test"),
    "bitsandbytes": ("bitsandbytes", "test"),
    "torchao": ("torchao", "test"),
    "torchmetrics": ("torchmetrics", "test"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional package is not installed; the message names it and the extra that installs it."""


def _missing_top_level(error: ModuleNotFoundError) -> str:
    """The top-level module whose absence raised ``error`` (``"safetensors"`` for ``safetensors.torch``)."""
    return (error.name or "").partition(".")[0]


def _install_hint(module: str) -> str:
    """``"pip install scikit-learn (or lora_ensemble[models])"`` for the top-level module ``"sklearn"``."""
    distribution, extra = OPTIONAL_PACKAGES[module]
    return f"pip install {distribution} (or lora_ensemble[{extra}])"


@contextmanager
def optional_dependency(needed_by: str) -> Iterator[None]:
    """Run the imports of the ``with`` block; if one fails because a package of
    :data:`OPTIONAL_PACKAGES` is not installed, raise :class:`MissingDependencyError`, e.g.
    ``lora_ensemble.io needs safetensors, which is not installed: pip install safetensors (or
    lora_ensemble[models])``, chained to the original error. Every other exception, and a missing
    module that is not one of them (a dependency of a dependency), propagates unchanged.

    Args:
        needed_by: what needs the package, for the message (``"lora_ensemble.io"``, ``"reliability_diagram"``).
    """
    try:
        yield
    except ModuleNotFoundError as error:
        missing = _missing_top_level(error)
        if missing not in OPTIONAL_PACKAGES or isinstance(error, MissingDependencyError):
            raise
        raise MissingDependencyError(f"{needed_by} needs {OPTIONAL_PACKAGES[missing][0]}, which is not installed: "
                                     f"{_install_hint(missing)}", name=missing) from error


def import_failure(module: str) -> str | None:
    """Why ``import module`` fails here, or None when it succeeds: "not installed" with the install hint
    only when the module itself is missing; otherwise the exception it raised, by type and message
    (a broken installation or a name clash must not read as a missing package)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        if _missing_top_level(error) == top:
            hint = f": {_install_hint(top)}" if top in OPTIONAL_PACKAGES else ""
            return f"{top} is not installed{hint}"
        return f"importing {module} failed: {type(error).__name__}: {error}"
    except Exception as error:  # reported, not swallowed: this is the report
        return f"importing {module} failed: {type(error).__name__}: {error}"
    return None
