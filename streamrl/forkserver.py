"""Where worker processes come from: a fork server that imported streamrl once.

Spawning a fresh interpreter for each worker costs seconds (importing torch and tensordict). Instead, workers are
forked from multiprocessing's fork server, which imports streamrl once and forks a clean, single-threaded copy
per worker. The CLI calls :func:`warm_up` before its own heavy imports, so the server imports in parallel with the
main process and the first worker of a run starts at once. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

PRELOAD = ["streamrl", "streamrl.placement"]


def worker_context() -> Any:
    """The multiprocessing context for worker groups: the fork server, or ``spawn`` where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server now (it imports in the background); later worker starts are fast."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
