"""What the stages and hooks of one process share: :class:`RunContext`.

Every process of a run (the main process, each worker process, each replica) has one. Its fields are always set:
the run directory, the event bus, the device, the seed, the pipeline's config, the process's name and replica
index, the pipeline this process runs (in a worker: its group's stages, the others as placeholders), and a
:class:`~streamrl.summary.RunRecorder` of the events published here (in the main process: every event of the
run, the workers' included). It also carries the run's stop state: :meth:`RunContext.request_stop` (drain) and
:meth:`RunContext.hurry` (a second Ctrl-C: end now).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import torch

from streamrl.events import EventBus
from streamrl.pipeline import MAIN, Pipeline
from streamrl.summary import RunRecorder

T = TypeVar("T")

HURRY_S = 1.0  # seconds the closes left get in all after a second Ctrl-C: the process exits well within 2 s


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RunContext:
    """Shared by the stages and hooks of one process; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        *,
        bus: EventBus,
        device: torch.device,
        seed: int,
        pipeline: Pipeline,
        recorder: RunRecorder,
        process: str = MAIN,
        replica: int = 0,
        restarts: int = 0,
        deterministic: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.deterministic = deterministic  # one process, a fixed schedule: blocking work runs inline
        self.bus = bus
        self.device = device
        self.seed = seed
        self.pipeline = pipeline  # what this process runs; in the main process, what a checkpoint saves
        self.config: Any = pipeline.config
        self.recorder = recorder
        self.process = process  # "main", or the worker group's name
        self.replica = replica  # which replica of a replicated group this process is (0 when not replicated)
        self.restarts = restarts  # how many times this replica was started again after its process died (Ray)
        self.stopping = False
        self.stop_reason: str | None = None
        self.stop_event = anyio.Event()
        self.cancel_now = anyio.Event()
        self.hurry_by: float | None = None  # after a second signal: anyio.current_time() by which closes must end
        self.closing: anyio.CancelScope | None = None  # the close in progress, which a second signal cuts short
        self.finalizing = False  # stages ended; closing the store, hooks and summary
        self.error: BaseException | None = None  # what the run fails with, set before the hooks close
        self.summary_written = False

    def request_stop(self, reason: str) -> None:
        """Ask sources to stop; the pipeline then drains. Safe to call more than once."""
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            self.stop_event.set()

    def hurry(self) -> None:
        """End the run now (a second Ctrl-C): cancel the stages and the lossy hooks' deliveries; the closes still
        to run (store, hooks, worker processes) share :data:`HURRY_S` seconds, then ``summary.json`` is written."""
        if self.hurry_by is None:
            self.hurry_by = anyio.current_time() + HURRY_S
            self.cancel_now.set()
            if self.closing is not None:
                self.closing.deadline = min(self.closing.deadline, self.hurry_by)

    @property
    def replica_id(self) -> int:
        """Which copy of its group this process is, restarts counted: ``replica`` at first, then after each restart
        a new id past every replica's (``replica + restarts * replicas``), so that a restarted replica gets fresh
        env seeds and ``traj_id``s."""
        return self.replica + self.restarts * self.pipeline.replicas_of(self.process)

    def elapsed(self) -> float:
        return self.bus.now()


async def off_loop(run: RunContext | None, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a worker thread, so that the event loop serves the other stages meanwhile; inline in a
    deterministic run, where the moment a thread finishes would change the order in which stages run."""
    if run is not None and run.deterministic:
        return func(*args)
    return await anyio.to_thread.run_sync(func, *args)
