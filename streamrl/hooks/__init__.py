"""Hooks: subscribers to the events of a run (logging, evaluation, checkpoints, schedules).

The logging hook and its sinks are exported here (and from ``streamrl``)::

    from streamrl.hooks import CSVSink, Logger, TensorBoardSink

Names are imported lazily (PEP 562): ``import streamrl.hooks`` loads nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

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


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
