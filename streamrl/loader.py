"""Load a pipeline file given on the command line: ``path/to/file.py[:build]``.

The file is imported as a module under a stable name, so that objects defined in it pickle by reference and
worker processes can import the same file again before they rebuild a stage group.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from streamrl.errors import ConfigError


def module_name_for(path: str | Path) -> str:
    resolved = Path(path).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return f"streamrl_pipeline_{resolved.stem}_{digest}"


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import the Python file at ``path`` (once per process) and return the module."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist; give the path of a .py file")
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
    except BaseException:
        del sys.modules[name]
        raise
    return module
