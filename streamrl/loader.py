"""Load a pipeline file given on the command line: ``path/to/file.py[:build]``.

The file is imported as a module under a stable name, so that objects defined in it pickle by reference and
worker processes can import the same file again before they rebuild a stage group.

A file that fails to import (a syntax error, an exception at import time) and a ``build()`` that raises or returns
something else than a :class:`~streamrl.pipeline.Pipeline` raise :class:`~streamrl.errors.PipelineFileError`
naming the file and the line of that file the error came from, with the original exception as ``__cause__``::

    pipelines/mine.py:42: build(cfg) raised ConfigError: DQNLoss: gamma must be in [0, 1], got 1.5
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from streamrl.errors import ConfigError, PipelineFileError

if TYPE_CHECKING:
    from streamrl.pipeline import Pipeline


def module_name_for(path: str | Path) -> str:
    resolved = Path(path).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return f"streamrl_pipeline_{resolved.stem}_{digest}"


def check_file(path: str | Path) -> Path:
    """``path`` as a Path if it names a file, else ConfigError; cheap (imports nothing), so the command line
    refuses a mistyped path before it loads torch."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist; give the path of a .py file")
    return file


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import the Python file at ``path`` (once per process) and return the module."""
    file = check_file(path)
    name = name or module_name_for(file)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file.resolve())
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, Exception):
            detail = exc.msg if isinstance(exc, SyntaxError) else exc
            raise PipelineFileError(f"{where(exc, file)}: importing the pipeline file raised "
                                    f"{type(exc).__name__}: {detail}") from exc
        raise
    return module


def call_build(build: Callable[[Any], Any], cfg: Any, file: str | Path) -> Pipeline:
    """``build(cfg)``, checked: a raise or a return value that is not a Pipeline becomes PipelineFileError."""
    from streamrl.pipeline import Pipeline

    name = getattr(build, "__name__", "build")
    try:
        pipeline = build(cfg)
    except Exception as exc:
        raise PipelineFileError(f"{where(exc, Path(file))}: {name}(cfg) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(pipeline, Pipeline):
        line = getattr(getattr(build, "__code__", None), "co_firstlineno", None)
        raise PipelineFileError(f"{file}{f':{line}' if line else ''}: {name}(cfg) returned {pipeline!r:.80}, not a "
                                "Pipeline; end it with `return pipeline` (the Pipeline it built)")
    return pipeline


def where(exc: BaseException, file: Path) -> str:
    """``"file:line"`` of the deepest traceback frame in ``file``: the line of the pipeline file that raised, or
    that called what raised (a syntax error: the line it is on)."""
    resolved = str(file.resolve())
    line = exc.lineno if isinstance(exc, SyntaxError) and exc.filename == resolved else None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == resolved:
            line = lineno
    return f"{file}:{line}" if line is not None else str(file)
