"""Checkpoints: the state of the stages (model, optimizer, counters) and RNGs, saved atomically.

::

    pipeline.add_hook(Checkpoint(learner, every_frames=50_000))   # and always at the end of the run

``<run dir>/checkpoint.pt`` is written through a temporary file and a rename, so a crash mid-save leaves the
previous checkpoint intact. It is saved in ``close``, which the runtime calls on every exit path (Ctrl-C and a
failed stage included).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrl.events import Event, Hook
from streamrl.runtime import RunContext
from streamrl.stages.base import Stage


class Checkpoint(Hook):
    """Saves ``stages``' state dicts every ``every_frames`` frames (if set) and at the end."""

    events = ("chunk",)
    mode = "lossy"

    def __init__(self, *stages: Stage, every_frames: int | None = None, filename: str = "checkpoint.pt",
                 name: str | None = None) -> None:
        super().__init__(name)
        self.stages = stages
        self.every_frames = every_frames
        self.filename = filename
        self.next_at = every_frames or 0
        self.run: RunContext | None = None

    async def start(self, run: RunContext) -> None:
        self.run = run

    async def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        if self.every_frames and self.run.recorder.frames >= self.next_at:
            self.next_at = self.run.recorder.frames + self.every_frames
            await self.save(self.run)

    def payload(self, run: RunContext) -> dict[str, Any]:
        return {
            "frames": run.recorder.frames if run.recorder is not None else None,
            "stages": {stage.name: stage.state_dict() for stage in self.stages},
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
