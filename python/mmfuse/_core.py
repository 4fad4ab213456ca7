"""Loads the compiled C++ core (`mmfuse._C`) once and says why when it cannot."""

from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """The `_C` module, or None when the package was not built with it (see `error()`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("mmfuse._C")
        except ImportError as exc:  # a source checkout without a build, or a broken wheel
            _error = f"{exc} (build it with `make build` or `pip install .`)"
    return _module


def require() -> ModuleType:
    mod = load()
    if mod is None:
        raise RuntimeError(f"mmfuse's C++ core is not available: {_error}")
    return mod


def error() -> str | None:
    load()
    return _error
