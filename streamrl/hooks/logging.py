"""Logging hooks: every event as a JSON line (structlog), and a metrics CSV.

::

    pipeline.add_hook(EventLog(), MetricsCSV(every_frames=5_000))

``events.jsonl`` holds one JSON object per event (``event`` = its kind, ``source``, ``t`` = seconds since the
run started, and its scalar data), but for ``batch``, ``loss`` (tensors) and ``status`` (what ``status.json``
holds, once a second); frequent kinds are thinned with ``every={"optim_step": 100}``.
``metrics.csv`` holds one row every ``every_frames`` frames and one per evaluation. Both files are flushed line
by line, so a crash loses nothing that was written; both are lossy subscribers (they never slow a stage, and the
summary reports any event they dropped). Both append, so a resumed run continues them.

A full disk stops the run: a write that fails with ``ENOSPC`` raises :class:`~streamrl.errors.DiskFull` naming
the file ("disk full writing runs/x/metrics.csv: free space and resume with --resume runs/x"), the run fails with
it (exit 1 from the CLI), and the hook writes nothing more (its ``close`` does not try again).
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import structlog
import torch

from streamrl.errors import DiskFull
from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext
from streamrl.rundir import on_disk_full, resume_advice


def scalar_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of an event's data: numbers, strings, bools, lists of numbers."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, (bool, int, str)) or value is None:
            out[key] = value
        elif isinstance(value, float):
            out[key] = value if math.isfinite(value) else None
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out[key] = list(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = value.item()
    return out


class RunFile:
    """A line-buffered file of the run directory that a hook appends to; a full disk closes it for good.

    Opening it first drops a torn last line (one without its newline: a write cut short by a full disk or a kill),
    so the lines a resumed run appends never run into a half line.

    ::

        log = RunFile(run.run_dir, "events.jsonl")
        with log.writing() as f:      # ENOSPC -> DiskFull naming the file; later writing() calls raise it again
            f.write(line)
        log.close()                   # flushes; a no-op once the disk filled up
    """

    def __init__(self, run_dir: str | Path, filename: str, *, newline: str | None = None) -> None:
        self.path = Path(run_dir) / filename
        self.advice = resume_advice(run_dir)
        self.full: DiskFull | None = None
        with on_disk_full(self.path, self.advice):
            _drop_torn_line(self.path)
            self.file: TextIO | None = open(self.path, "a", newline=newline, buffering=1)

    @contextlib.contextmanager
    def writing(self) -> Iterator[TextIO]:
        if self.full is not None:
            raise self.full
        assert self.file is not None, f"{self.path} is closed"
        try:
            with on_disk_full(self.path, self.advice):
                yield self.file
        except DiskFull as exc:
            self.full = exc
            self._drop()
            raise

    def _drop(self) -> None:
        """Close without caring about what is still buffered (the disk is full: it cannot be written)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def close(self) -> None:
        if self.file is not None and self.full is None:
            with self.writing() as f:
                f.flush()
        self._drop()


def _drop_torn_line(path: Path, block: int = 1 << 16) -> None:
    """Truncate ``path`` after its last newline, if its last line has none."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, 2)
        if end == 0 or (f.seek(end - 1), f.read(1))[1] == b"\n":
            return
        stop = end
        while stop > 0:
            start = max(0, stop - block)
            f.seek(start)
            newline = f.read(stop - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            stop = start
        f.truncate(0)


class EventLog(Hook):
    """Writes events to ``<run dir>/events.jsonl`` with structlog's JSON renderer."""

    # batch and loss carry tensors only: nothing a JSON line could hold; status (the runtime's figures, once a
    # second) is status.json's content
    events = ("*", "-batch", "-loss", "-status")
    mode = "lossy"
    main_only = True
    capacity = 4096

    def __init__(self, filename: str = "events.jsonl", *, every: dict[str, int] | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.filename = filename
        self.every = {"optim_step": 100, "stored": 100, "weights": 100,
                      **(every or {})}
        self.counts: dict[str, int] = {}
        self.file: RunFile | None = None
        self.logger: Any = None

    async def start(self, run: RunContext) -> None:
        self.file = RunFile(run.run_dir, self.filename)
        self.logger = structlog.wrap_logger(
            structlog.WriteLogger(self.file.file),
            processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()],
        )

    def on_event(self, event: Event) -> None:
        n = self.counts.get(event.kind, 0)
        self.counts[event.kind] = n + 1
        if n % self.every.get(event.kind, 1):
            return
        self._log(event.kind, source=event.source, t=round(event.time, 4), **scalar_fields(event.data))

    def _log(self, kind: str, **fields: Any) -> None:
        assert self.file is not None
        with self.file.writing():
            self.logger.info(kind, **fields)

    async def close(self, run: RunContext) -> None:
        if self.file is not None and self.file.full is None:
            self._log("run_end", source="runtime", t=round(run.elapsed(), 4), counts=self.counts)
            self.file.close()
        self.file = None


class MetricsCSV(Hook):
    """Appends a row to ``<run dir>/metrics.csv`` every ``every_frames`` frames and after each evaluation."""

    events = ("chunk", "eval", "optim_step")
    mode = "lossy"
    main_only = True
    capacity = 4096
    COLUMNS = ("frames", "wall_s", "frames_per_s", "episodes", "episode_return", "episode_length", "optim_steps",
               "loss", "policy_version", "batch_age_mean", "eval_return")

    def __init__(self, filename: str = "metrics.csv", *, every_frames: int = 10_000, name: str | None = None):
        super().__init__(name)
        self.filename = filename
        self.every_frames = every_frames
        self.file: RunFile | None = None
        self.writer: Any = None
        self.run: RunContext | None = None
        self.next_row_at = every_frames
        self._returns: list[float] = []
        self._lengths: list[int] = []
        self._losses: list[float] = []
        self._ages: list[float] = []
        self._last_row: tuple[int, float] = (0, 0.0)

    async def start(self, run: RunContext) -> None:
        self.run = run
        self.file = RunFile(run.run_dir, self.filename, newline="")
        path = Path(run.run_dir) / self.filename
        fresh = path.stat().st_size == 0  # after RunFile dropped a torn last line (a torn header, too)
        with self.file.writing() as f:
            self.writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            if fresh:
                self.writer.writeheader()
        if run.recorder is not None:
            self.next_row_at = run.recorder.frames + self.every_frames

    def on_event(self, event: Event) -> None:
        assert self.run is not None and self.run.recorder is not None
        data = event.data
        if event.kind == "chunk":
            self._returns.extend(data.get("episode_returns", ()))
            self._lengths.extend(data.get("episode_lengths", ()))
            if self.run.recorder.frames >= self.next_row_at:
                self.next_row_at += self.every_frames * max(1, (self.run.recorder.frames - self.next_row_at)
                                                            // self.every_frames + 1)
                self.write_row(event.time)
        elif event.kind == "optim_step":
            if "loss" in data:
                self._losses.append(data["loss"])
            if "age_mean" in data:
                self._ages.append(data["age_mean"])
        elif event.kind == "eval":
            self.write_row(event.time, eval_return=data["mean_return"])

    def write_row(self, wall_s: float, eval_return: float | None = None) -> None:
        assert self.run is not None and self.run.recorder is not None and self.file is not None
        rec = self.run.recorder
        last_frames, last_wall = self._last_row
        rate = (rec.frames - last_frames) / (wall_s - last_wall) if wall_s > last_wall else 0.0
        row = {
            "frames": rec.frames,
            "wall_s": round(wall_s, 3),
            "frames_per_s": round(rate, 1),
            "episodes": rec.episodes,
            "episode_return": _mean(self._returns),
            "episode_length": _mean(self._lengths),
            "optim_steps": rec.optim_steps,
            "loss": _mean(self._losses),
            "policy_version": rec.policy_version,
            "batch_age_mean": _mean(self._ages),
            "eval_return": eval_return if eval_return is not None else "",
        }
        with self.file.writing():
            self.writer.writerow(row)
        self._last_row = (rec.frames, wall_s)
        self._returns.clear()
        self._lengths.clear()
        self._losses.clear()
        self._ages.clear()

    async def close(self, run: RunContext) -> None:
        if self.file is not None and self.file.full is None:
            if run.recorder is not None and run.recorder.frames > self._last_row[0]:
                self.write_row(run.elapsed())
            self.file.close()
        self.file = None


def _mean(values: list[Any]) -> float | str:
    return round(sum(values) / len(values), 6) if values else ""
