"""The progress bar: frames, frames/s, last evaluation return and loss, on stderr.

::

    pipeline.add_hook(ProgressBar(total_frames=cfg.total_frames))

It is a lossy subscriber (it never slows a stage) and hides itself when stderr is not a terminal.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext


class ProgressBar(Hook):
    """A tqdm bar over frames, updated from ``chunk``, ``eval`` and ``optim_step`` events."""

    events = ("chunk", "eval", "optim_step")
    mode = "lossy"
    main_only = True

    def __init__(self, total_frames: int | None = None, *, disable: bool | None = None, name: str | None = None):
        super().__init__(name)
        self.total_frames = total_frames
        self.disable = disable
        self.bar: Any = None
        self.run: RunContext | None = None
        self.postfix: dict[str, str] = {}

    async def start(self, run: RunContext) -> None:
        self.run = run
        self.bar = tqdm(total=self.total_frames, unit="frame", unit_scale=True, dynamic_ncols=True,
                        disable=self.disable, desc="frames", mininterval=0.5)

    def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        rec = self.run.recorder
        if event.kind == "chunk":
            self.bar.update(rec.frames - self.bar.n)
            if rec.last_episode_return is not None:
                self.postfix["ep_return"] = f"{rec.last_episode_return:.1f}"
        elif event.kind == "eval":
            self.postfix["eval"] = f"{event.data['mean_return']:.1f}"
        elif event.kind == "optim_step" and "loss" in event.data:
            self.postfix["loss"] = f"{event.data['loss']:.4f}"
            return  # frequent: refreshed with the next chunk
        self.bar.set_postfix(self.postfix, refresh=False)

    async def close(self, run: RunContext) -> None:
        if self.bar is not None:
            if run.recorder is not None:
                self.bar.update(run.recorder.frames - self.bar.n)
            self.bar.close()
