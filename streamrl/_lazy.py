"""Lazy namespaces (PEP 562): a package names its public objects and the modules that define them, and each is
imported on first use, so ``import streamrl`` (and a usage error of the command line) loads no torch.

::

    _EXPORTS = {"GymEnv": "streamrl.envs.gym", ...}
    __getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_namespace(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]],
                                                                       list[str]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, and its ``__all__`` (sorted names)."""
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}; its public names are listed in "
                                 f"{package}.__all__", name=name, obj=sys.modules[package])
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups find it without this function
        return value

    def __dir__() -> list[str]:
        return list(names)

    return __getattr__, __dir__, names
