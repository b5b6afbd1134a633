"""Where worker processes come from: a fork server that imported streamrl once.

Spawning a fresh interpreter for each worker costs seconds (importing torch and tensordict). Instead, workers are
forked from multiprocessing's fork server, which imports streamrl once and forks a clean, single-threaded copy
per worker. The CLI calls :func:`warm_up` before its own heavy imports, so the server imports in parallel with the
main process and the first worker of a run starts at once. This module imports nothing heavy on purpose.

The fork server imports streamrl from where this process did, whatever the current folder holds. multiprocessing
starts it as ``python -c ...``, which puts the current folder first on ``sys.path`` (and, in Python 3.11, ignores
the ``sys.path`` of the process that starts it): run from a folder holding a ``streamrl/`` directory (the parent
of a clone, say), the server would import that directory instead, and every worker would fail with
``ImportError: cannot import name ... from 'streamrl' (unknown location)``. So the server starts with
``PYTHONSAFEPATH=1`` (no current folder on its path) and, when streamrl does not come from a site-packages
directory, with the folder holding this process's streamrl first on ``PYTHONPATH``. Each worker then takes the
rest of this process's ``sys.path`` (multiprocessing sends it along), for the pipeline's own modules.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import site
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRELOAD = ["streamrl", "streamrl.execution.main"]
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder from which this process imported streamrl


def worker_context() -> Any:
    """The multiprocessing context for worker groups: the fork server (started now if need be, importing streamrl
    from where this process did), or ``spawn`` where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")  # spawn hands this process's sys.path to the child before it imports
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    _ensure_fork_server()
    return ctx


def warm_up() -> None:
    """Start the fork server now (it imports in the background); later worker starts are fast."""
    worker_context()


def _ensure_fork_server() -> None:
    from multiprocessing import forkserver

    with _import_streamrl_from_here():
        forkserver.ensure_running()  # does nothing when it runs already


@contextlib.contextmanager
def _import_streamrl_from_here() -> Iterator[None]:
    """Environment variables under which a child interpreter imports the streamrl this process imported."""
    saved = {name: os.environ.get(name) for name in ("PYTHONSAFEPATH", "PYTHONPATH")}
    os.environ["PYTHONSAFEPATH"] = "1"
    site_dirs = {Path(d).resolve() for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if PACKAGE_ROOT not in site_dirs:  # a clone (editable install, or on sys.path): put it first
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
