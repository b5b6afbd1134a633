"""Hooks: subscribers to the events of a run (logging, evaluation, checkpoints, schedules).

The logging hook and its sinks are exported here (and from ``streamrl``)::

    from streamrl.hooks import CSVSink, Logger, TensorBoardSink

Names are imported lazily (PEP 562): ``import streamrl.hooks`` loads nothing else.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "CSVSink": "streamrl.hooks.loggers",
    "Logger": "streamrl.hooks.loggers",
    "Sink": "streamrl.hooks.loggers",
    "TensorBoardSink": "streamrl.hooks.loggers",
    "WandbSink": "streamrl.hooks.loggers",
}

# For type checkers only (at run time ``__getattr__`` imports each name on first use); ruff cannot evaluate
# ``__all__ = sorted(_EXPORTS)``, so it would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from streamrl.hooks.loggers import CSVSink, Logger, Sink, TensorBoardSink, WandbSink


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamrl.hooks' has no attribute {name!r}; its exported names are listed in "
                             "streamrl.hooks.__all__ (the other hooks live in its modules)", name=name,
                             obj=sys.modules[__name__])
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
