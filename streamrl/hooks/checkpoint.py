"""Checkpoints: everything ``streamrl run FILE --resume RUN_DIR`` needs, saved atomically.

::

    pipeline.add_hook(Checkpoint(every_frames=20_000))   # and always at the end of the run

``<run dir>/checkpoint.pt`` holds the state dicts of every stage (model, optimizer, learner counters, the
replay buffer's rate limiter, sampler and storage; an env's transforms, e.g. normaliser statistics) and of the
main process's hooks, the frames each collecting stage reached, and the RNG states. Stages in a worker process are
saved from the main process's copy of them plus the progress their events reported (their frame counts); what
changes inside a worker while it runs (epsilon, policy weights) follows from the frames and the learner's state.
A replay store on disk is not copied: the checkpoint names it and :class:`~streamrl.ZarrStorage` reopens it
with every committed row (rows stored after the checkpoint included). A RAM storage is saved whole.

The file is written through a temporary file and a rename, so a crash mid-save leaves the previous checkpoint
intact. It is saved in ``close`` too, which the runtime calls on every exit path (Ctrl-C and a failed stage
included); after ``kill -9`` the last periodic checkpoint is what a resume starts from.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrl.events import Event, Hook
from streamrl.pipeline import MAIN
from streamrl.runtime import RunContext

FORMAT = "streamrl.checkpoint/1"


class Checkpoint(Hook):
    """Saves the run's state every ``every_frames`` frames (if set) and at the end; see the module docstring."""

    events = ("chunk",)
    mode = "lossy"

    def __init__(self, *, every_frames: int | None = None, filename: str = "checkpoint.pt",
                 name: str | None = None) -> None:
        super().__init__(name)
        self.every_frames = every_frames
        self.filename = filename
        self.next_at = every_frames or 0
        self.run: RunContext | None = None

    async def start(self, run: RunContext) -> None:
        self.run = run
        if self.every_frames and run.recorder is not None:
            self.next_at = run.recorder.frames + self.every_frames

    async def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        if self.every_frames and self.run.recorder.frames >= self.next_at:
            self.next_at = self.run.recorder.frames + self.every_frames
            await self.save(self.run)

    def payload(self, run: RunContext) -> dict[str, Any]:
        assert run.pipeline is not None and run.recorder is not None
        pipeline, progress = run.pipeline, dict(run.recorder.frames_by_source)
        stages = {}
        for stage in pipeline.stages.values():
            state = stage.state_dict()
            if pipeline.process_of(stage.name) != MAIN:  # the worker's copy is ahead of ours: take what events said
                if "frames" in state:
                    state["frames"] = progress.get(stage.name, state["frames"])
                if "version" in state:
                    state["version"] = run.recorder.policy_version
            stages[stage.name] = state
        return {
            "format": FORMAT,
            "frames": run.recorder.frames,
            "wall_s": run.elapsed(),
            "progress": progress,
            "stages": stages,
            "hooks": {hook.name: hook.state_dict() for hook in pipeline.hooks_in(MAIN) if hook is not self},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    async def save(self, run: RunContext) -> Path:
        path = Path(run.run_dir) / self.filename
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.payload(run), tmp)
        os.replace(tmp, path)
        await run.bus.publish("checkpoint", self.name, {"path": str(path), "frames": run.recorder.frames
                                                        if run.recorder else None})
        return path

    async def close(self, run: RunContext) -> None:
        await self.save(run)
