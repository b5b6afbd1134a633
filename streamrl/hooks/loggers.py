"""Named scalars for the logging tools users already use: a CSV file, TensorBoard, Weights & Biases.

::

    from streamrl import CSVSink, Logger, TensorBoardSink, WandbSink

    pipeline.add_hook(Logger(CSVSink(), TensorBoardSink()))                      # scalars.csv + tensorboard/
    pipeline.add_hook(Logger(WandbSink("cartpole", mode="online"), every_frames=5_000))

    # tensorboard --logdir runs/          (every run directory's tensorboard/ folder is one run)

:class:`Logger` is a lossy, main-process hook (it never slows a stage; the summary counts any event it dropped). It
turns the events of the run into **named scalars** and hands them to each sink with the run's env frames as the
x-axis (and the seconds since the run started, ``wall_s``):

* ``train/<key>`` for every scalar the learner's ``optim_step`` event carries: ``train/loss``, each ``loss_*``
  term, ``train/entropy``, ``train/kl_approx``, ``train/clip_fraction`` (PPO), ``train/q_value``,
  ``train/target_value`` (value losses), ``train/grad_norm``, ``train/lr``, ``train/age_mean`` (how many weight
  versions old the replayed rows were) ... and ``train/step`` (optimizer steps so far). A scalar a loss starts
  returning tomorrow shows up under its own name without a change here.
* ``collect/frames_per_s`` (all collectors together), ``collect/episode_return`` and ``collect/episode_length``
  (mean of the episodes that ended), ``collect/episodes`` (so far), ``collect/policy_lag`` (weight versions the
  acting policy was behind the learner's latest, per chunk), and ``collect/<key>`` for any other scalar a
  ``chunk`` event carries.
* ``explore/<key>`` for each scalar of the policy stage's ``explore`` event, published at each chunk's start by
  the policy's modules that report some (``scalars()``): ``explore/epsilon`` (``EGreedyModule``),
  ``explore/sigma`` (the action noise scale of ``AdditiveGaussianModule`` and ``OrnsteinUhlenbeckModule``).
* ``eval/return`` (mean over the evaluation episodes), ``eval/return_min``, ``eval/return_max``,
  ``eval/return_std``.
* The pipeline's telemetry, from the runtime's ``status`` event (the figures of ``status.json``, about once a
  second; none in a ``--deterministic`` run): ``stage/<stage>/busy`` (the share of the last seconds the stage
  worked; ``env[2]`` for replica 2), ``stage/<stage>/frames_per_s`` (stages that collect),
  ``stream/<stream>/depth`` (items queued) and ``stream/<stream>/fill`` (depth / capacity; streams with room
  for items), ``pipeline/updates_per_s`` (the learner's). Stage and stream names keep letters, digits, ``_.-[]``
  (anything else becomes ``_``: ``learner.weights (latest)`` is ``stream/learner.weights_latest/depth``).

``every_frames=None`` (the default) writes each event's scalars as it comes: a ``train/`` point every
``report_every`` updates, a ``collect/`` and an ``explore/`` point per chunk, the telemetry once a second.
``every_frames=N`` averages the ``train/``, ``collect/``, ``explore/`` and telemetry scalars (``train/`` weighted
by the updates each report covers) and writes one point per name every ``N`` frames; evaluations are always
written at once.

Sinks are objects with ``open(run_dir)``, ``write(frames, wall_s, scalars)`` and ``close()`` (:class:`Sink`):

* :class:`CSVSink` writes ``<run dir>/scalars.csv`` in **long format**, one row per scalar: ``frames,wall_s,name,
  value``. A scalar that first appears late in the run (an evaluation, a loss term) needs no new column, the file
  never has to be rewritten, and a resumed run appends to it. ``streamrl.plots.plot_runs`` reads it; so does
  pandas (``pd.read_csv(f).pivot_table(index="frames", columns="name", values="value")`` is the wide table).
* :class:`TensorBoardSink` writes TensorBoard event files under ``<run dir>/tensorboard`` (step = frames) with
  ``torch.utils.tensorboard.SummaryWriter``; it needs the ``tensorboard`` package
  (``pip install 'streamrl[tensorboard]'``).
* :class:`WandbSink` logs to Weights & Biases (``wandb``, installed apart: ``pip install wandb``), offline by
  default (``wandb sync`` uploads later); its x-axis is the ``frames`` metric.

A missing package fails the run at start (before any stage runs) with the command that installs it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from streamrl.errors import ConfigError
from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext
from streamrl.hooks.logging import RunFile

#: Keys of a ``chunk`` event that are not per-chunk scalars of their own (the Logger derives its figures from them).
_CHUNK_KEYS = frozenset({"frames", "chunk_frames", "policy_version", "episode_returns", "episode_lengths"})
#: Keys of an ``optim_step`` event that are counters, not means over the report's updates.
_OPTIM_COUNTERS = frozenset({"step", "version", "updates"})
#: ``eval`` event keys and the scalar each one becomes.
_EVAL_NAMES = {"mean_return": "eval/return", "min_return": "eval/return_min", "max_return": "eval/return_max",
               "std_return": "eval/return_std"}
#: Characters a stage or stream name keeps in a scalar's name (others become ``_``).
_UNSAFE = re.compile(r"[^\w.\-\[\]]+")


def _tag(name: str) -> str:
    """A stage or stream name as part of a scalar's name: ``"env.chunks [2]"`` -> ``"env.chunks_[2]"``."""
    return _UNSAFE.sub("_", name).strip("_") or "_"


def status_scalars(status: dict[str, Any]) -> dict[str, float]:
    """The telemetry scalars of a ``status`` event (the dict ``status.json`` holds); see the module docstring."""
    scalars: dict[str, float] = {}
    for label, stage in (status.get("stages") or {}).items():
        for key in ("busy", "frames_per_s"):
            if (value := _number(stage.get(key))) is not None:
                scalars[f"stage/{_tag(label)}/{key}"] = value
    for name, stream in (status.get("streams") or {}).items():
        depth, capacity = _number(stream.get("depth")), _number(stream.get("capacity"))
        if depth is not None:
            scalars[f"stream/{_tag(name)}/depth"] = depth
            if capacity:
                scalars[f"stream/{_tag(name)}/fill"] = depth / capacity
    if (value := _number(status.get("updates_per_s"))) is not None:
        scalars["pipeline/updates_per_s"] = value
    return scalars


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number (bools, strings, lists) or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Sink(ABC):
    """Where a :class:`Logger` writes its scalars. Subclass it to log anywhere else::

        class PrintSink(Sink):
            def write(self, frames, wall_s, scalars):
                print(frames, scalars)
    """

    def open(self, run_dir: Path, run: RunContext | None = None) -> None:
        """Called once when the run starts (before any stage): open files, import the client library."""

    @abstractmethod
    def write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (name -> value) at env frame ``frames``, ``wall_s`` seconds into the run."""

    def close(self) -> None:
        """Flush and release; called once on every exit path."""


class CSVSink(Sink):
    """``<run dir>/<filename>`` in long format: one ``frames,wall_s,name,value`` row per scalar, line-buffered.

    Appends (a resumed run continues the file); the header is written once, to a new file. A full disk stops the
    run with :class:`~streamrl.errors.DiskFull` naming the file.
    """

    COLUMNS = ("frames", "wall_s", "name", "value")

    def __init__(self, filename: str = "scalars.csv") -> None:
        self.filename = filename
        self.file: RunFile | None = None
        self.writer: Any = None

    def open(self, run_dir: Path, run: RunContext | None = None) -> None:
        self.file = RunFile(run_dir, self.filename, newline="")
        fresh = self.file.path.stat().st_size == 0  # after RunFile dropped a torn last line (a torn header, too)
        with self.file.writing() as f:
            self.writer = csv.writer(f)
            if fresh:
                self.writer.writerow(self.COLUMNS)

    def write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        assert self.file is not None, "CSVSink.write before open"
        wall = round(wall_s, 3)
        with self.file.writing():
            self.writer.writerows([(frames, wall, name, repr(value)) for name, value in scalars.items()])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = None


class TensorBoardSink(Sink):
    """TensorBoard event files under ``log_dir`` (default ``<run dir>/tensorboard``), step = env frames.

    Needs the ``tensorboard`` package (``pip install 'streamrl[tensorboard]'``); without it the run fails at start.
    """

    def __init__(self, log_dir: str | Path | None = None, *, flush_secs: int = 30) -> None:
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.writer: Any = None

    def open(self, run_dir: Path, run: RunContext | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"TensorBoardSink needs the tensorboard package, which is not installed ({exc}); "
                              "install it with: pip install 'streamrl[tensorboard]'") from None
        log_dir = Path(self.log_dir) if self.log_dir is not None else Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=self.flush_secs)

    def write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        assert self.writer is not None, "TensorBoardSink.write before open"
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=frames)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes
        self.writer = None


class WandbSink(Sink):
    """Weights & Biases: one W&B run per streamrl run, ``frames`` as the x-axis of every scalar.

    ``mode="offline"`` (the default) writes under ``<run dir>/wandb`` and uploads nothing (``wandb sync`` does,
    later); ``"online"`` logs live. ``name`` defaults to the run directory's name, ``config`` to the pipeline's
    config (a dataclass); other keyword arguments go to ``wandb.init``. Needs ``wandb`` (``pip install wandb``).
    """

    def __init__(self, project: str, *, mode: str = "offline", name: str | None = None, config: Any = None,
                 **init_kwargs: Any) -> None:
        self.project = project
        self.mode = mode
        self.name = name
        self.config = config
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def open(self, run_dir: Path, run: RunContext | None = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"WandbSink needs the wandb package, which is not installed ({exc}); install it "
                              "with: pip install wandb") from None
        config = self.config
        if config is None and run is not None and dataclasses.is_dataclass(run.config):
            config = dataclasses.asdict(run.config)  # type: ignore[arg-type]
        kwargs = {"dir": str(run_dir), **self.init_kwargs}
        self.run = wandb.init(project=self.project, mode=self.mode, name=self.name or Path(run_dir).name,
                              config=config, **kwargs)
        self.run.define_metric("frames")
        self.run.define_metric("*", step_metric="frames")

    def write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        assert self.run is not None, "WandbSink.write before open"
        self.run.log({"frames": frames, "wall_s": wall_s, **scalars})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
        self.run = None


class _Window:
    """Weighted means of scalars since the last write."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def take(self) -> dict[str, float]:
        means = {name: self.sums[name] / w for name, w in self.weights.items() if w > 0}
        self.sums.clear()
        self.weights.clear()
        return means


class Logger(Hook):
    """Turns the run's events into named scalars and writes them to each sink; see the module docstring.

    ::

        pipeline.add_hook(Logger(CSVSink(), TensorBoardSink(), every_frames=1_000))

    The scalars, by the event they come from (details in the module docstring):

    * ``optim_step``: ``train/loss``, ``train/loss_*``, ``train/grad_norm``, ``train/lr``, ``train/q_value``,
      ``train/target_value``, ``train/entropy``, ``train/kl_approx``, ``train/clip_fraction``, ``train/age_mean``,
      ``train/step``: every number the learner reports, under ``train/``;
    * ``chunk``: ``collect/frames_per_s``, ``collect/episode_return``, ``collect/episode_length``,
      ``collect/episodes``, ``collect/policy_lag``;
    * ``explore`` (the policy stage, at each chunk's start): ``explore/epsilon``, ``explore/sigma``;
    * ``eval``: ``eval/return``, ``eval/return_min``, ``eval/return_max``, ``eval/return_std``;
    * ``status`` (the runtime, about once a second): ``stage/<stage>/busy``, ``stage/<stage>/frames_per_s``,
      ``stream/<stream>/depth``, ``stream/<stream>/fill``, ``pipeline/updates_per_s``.
    """

    events = ("chunk", "optim_step", "eval", "weights", "explore", "status")
    mode = "lossy"
    main_only = True
    capacity = 4096

    def __init__(self, *sinks: Sink, every_frames: int | None = None, name: str | None = None) -> None:
        super().__init__(name)
        if not sinks:
            raise ConfigError("Logger needs at least one sink, got none: Logger(CSVSink(), TensorBoardSink(), "
                              "WandbSink(project))")
        for sink in sinks:
            if not isinstance(sink, Sink):
                raise ConfigError(f"Logger takes sinks (CSVSink(), TensorBoardSink(), WandbSink(project) or a "
                                  f"Sink subclass), got {type(sink).__name__}: {sink!r}")
        if every_frames is not None and every_frames < 1:
            raise ConfigError(f"Logger: every_frames must be None (write every event) or >= 1, got {every_frames}")
        self.sinks = sinks
        self.every_frames = every_frames
        self.opened: list[Sink] = []
        self.failed = False
        self.frames_by_source: dict[str, int] = {}
        self.version = 0  # the learner's latest weights version, as this hook's events tell it
        self.window = _Window()
        self.step: int | None = None
        self.episodes = 0
        self.next_write_at = every_frames or 0
        self._rate_from: tuple[int, float] | None = None  # (frames, wall_s) where collect/frames_per_s starts

    @property
    def frames(self) -> int:
        """Env frames so far, all collectors together (from the chunk events this hook has handled)."""
        return sum(self.frames_by_source.values())

    async def start(self, run: RunContext) -> None:
        if run.recorder is not None:  # a resumed run starts from the checkpoint's frames
            self.frames_by_source = dict(run.recorder.frames_by_source)
            self.episodes = run.recorder.episodes
            self.version = run.recorder.policy_version
        self._rate_from = (self.frames, run.elapsed())
        if self.every_frames is not None:
            self.next_write_at = self.frames + self.every_frames
        try:
            for sink in self.sinks:
                sink.open(Path(run.run_dir), run)
                self.opened.append(sink)
        except BaseException:
            self._close_sinks()
            raise

    def on_event(self, event: Event) -> None:
        data = event.data
        kind = event.kind
        if kind == "weights":
            self.version = max(self.version, int(data.get("version", self.version)))
            return
        if kind == "eval":
            scalars = {name: v for key, name in _EVAL_NAMES.items() if (v := _number(data.get(key))) is not None}
            frames = int(data.get("frames", self.frames))
            self._write(frames, event.time, scalars)
            return
        if kind == "optim_step":
            weight = float(data.get("updates", 1) or 1)
            for key, value in data.items():
                number = _number(value)
                if number is not None and key not in _OPTIM_COUNTERS:
                    self.window.add(f"train/{key}", number, weight)
            if "step" in data:
                self.step = int(data["step"])
            if "version" in data:
                self.version = max(self.version, int(data["version"]))
        elif kind == "chunk":
            self.frames_by_source[event.source] = int(data["frames"])
            returns = data.get("episode_returns") or ()
            for value in returns:
                self.window.add("collect/episode_return", float(value))
            for value in data.get("episode_lengths") or ():
                self.window.add("collect/episode_length", float(value))
            self.episodes += len(returns)
            if "policy_version" in data:
                self.window.add("collect/policy_lag", float(self.version - int(data["policy_version"])))
            for key, value in data.items():
                number = _number(value)
                if number is not None and key not in _CHUNK_KEYS:
                    self.window.add(f"collect/{key}", number)
        elif kind == "explore":
            for key, value in data.items():
                if (number := _number(value)) is not None:
                    self.window.add(f"explore/{key}", number)
        elif kind == "status":
            for name, value in status_scalars(data).items():
                self.window.add(name, value)
        else:
            return
        if self.every_frames is None or self.frames >= self.next_write_at:
            if self.every_frames is not None:
                self.next_write_at += self.every_frames * ((self.frames - self.next_write_at) // self.every_frames + 1)
            self._flush(event.time, with_rate=kind == "chunk" or self.every_frames is not None)

    def _flush(self, wall_s: float, *, with_rate: bool) -> None:
        scalars = self.window.take()
        if with_rate and self._rate_from is not None:
            frames0, wall0 = self._rate_from
            if wall_s > wall0 and self.frames > frames0:
                scalars["collect/frames_per_s"] = (self.frames - frames0) / (wall_s - wall0)
                self._rate_from = (self.frames, wall_s)
        if "collect/policy_lag" in scalars or "collect/episode_return" in scalars:
            scalars["collect/episodes"] = float(self.episodes)
        if self.step is not None and any(name.startswith("train/") for name in scalars):
            scalars["train/step"] = float(self.step)
        self._write(self.frames, wall_s, scalars)

    def _write(self, frames: int, wall_s: float, scalars: dict[str, float]) -> None:
        if scalars:
            try:
                for sink in self.opened:
                    sink.write(frames, wall_s, scalars)
            except BaseException:
                self.failed = True  # e.g. a full disk: the run fails with it, and close writes nothing more
                raise

    async def close(self, run: RunContext) -> None:
        try:
            if self.opened and not self.failed:
                self._flush(run.elapsed(), with_rate=self.every_frames is not None)  # the last partial window
        finally:
            self._close_sinks()

    def _close_sinks(self) -> None:
        sinks, self.opened = self.opened, []
        errors = []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:  # close every sink; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]
