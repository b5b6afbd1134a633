"""The run recorder: folds the events of a run into the figures of ``summary.json``.

It is subscribed (lockstep, cheap) by the runtime to every run, so the summary exists whatever hooks a
pipeline adds. Other hooks (progress bar, metrics CSV) read its running figures instead of recounting.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from streamrl.events import Event
from streamrl.rundir import on_disk_full


class _MinMeanMax:
    """Running min / mean / max of a quantity reported as (min, mean, max) per observation."""

    def __init__(self) -> None:
        self.min: float | None = None
        self.max: float | None = None
        self.total = 0.0
        self.count = 0

    def add(self, lo: float, mean: float, hi: float) -> None:
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.total += mean
        self.count += 1

    def as_dict(self) -> dict[str, float | None]:
        mean = self.total / self.count if self.count else None
        return {"min": self.min, "mean": mean, "max": self.max}


class RunRecorder:
    """Running totals of a run: frames, episodes, evaluations, optimizer steps, policy lag.

    ``policy_lag``: for each chunk, how many weight versions the acting policy was behind the learner's latest
    when the chunk arrived. ``batch_policy_age``: for each learner batch, how many versions old its rows were
    (large for off-policy replay by design; bounded by ``max_policy_lag`` for on-policy learning).
    """

    def __init__(self) -> None:
        self.frames_by_source: dict[str, int] = {}
        self.resumed_from: int | None = None  # frames of the checkpoint a resumed run started from
        self.episodes = 0
        self.last_episode_return: float | None = None
        self.eval_return_last: float | None = None
        self.eval_return_best: float | None = None
        self.evals = 0
        self.solved = False
        self.frames_to_solve: int | None = None
        self.wall_s_to_solve: float | None = None
        self.optim_steps = 0
        self.loss_last: float | None = None
        self.policy_version = 0
        self.lag = _MinMeanMax()  # acting policy's versions behind the learner, per chunk
        self.lag_by_source: dict[str, _MinMeanMax] = {}  # the same, per chunk source (one per replica)
        self.batch_age = _MinMeanMax()  # versions behind the learner of the rows in a batch (replay age)
        self.last_time = 0.0
        self.learner: dict[str, Any] = {}  # how updates ran (captured or why not) and where replay rows lived

    @property
    def frames(self) -> int:
        return sum(self.frames_by_source.values())

    def on_event(self, event: Event) -> None:
        data = event.data
        self.last_time = max(self.last_time, event.time)
        kind = event.kind
        if kind == "chunk":
            self.frames_by_source[event.source] = data["frames"]
            if "policy_version" in data:
                lag = self.policy_version - data["policy_version"]
                self.lag.add(lag, lag, lag)
                self.lag_by_source.setdefault(event.source, _MinMeanMax()).add(lag, lag, lag)
            returns = data.get("episode_returns") or ()
            if returns:
                self.episodes += len(returns)
                self.last_episode_return = float(returns[-1])
        elif kind == "optim_step":
            self.optim_steps = data.get("step", self.optim_steps + 1)
            if "loss" in data:
                self.loss_last = float(data["loss"])
            if "age_mean" in data:
                self.batch_age.add(data["age_min"], data["age_mean"], data["age_max"])
        elif kind == "weights":
            self.policy_version = data["version"]
        elif kind == "learner":
            self.learner.update(device=data["device"], captured=data["captured"], capture_reason=data["reason"])
        elif kind == "replay_device":
            self.learner.update(replay_on_device=data["mirrored"], replay_reason=data["reason"])
        elif kind == "eval":
            self.evals += 1
            value = float(data["mean_return"])
            self.eval_return_last = value
            self.eval_return_best = value if self.eval_return_best is None else max(self.eval_return_best, value)
            if data.get("solved") and not self.solved:
                self.solved = True
                self.frames_to_solve = int(data.get("frames", self.frames))
                self.wall_s_to_solve = event.time

    def lag_of(self, sources: list[str]) -> dict[str, float | None]:
        """Policy lag (min, mean, max over chunks) of the chunks these sources published."""
        merged = _MinMeanMax()
        for source in sources:
            lag = self.lag_by_source.get(source)
            if lag is not None and lag.count:
                merged.min = lag.min if merged.min is None else min(merged.min, lag.min)  # type: ignore[type-var]
                merged.max = lag.max if merged.max is None else max(merged.max, lag.max)  # type: ignore[type-var]
                merged.total += lag.total
                merged.count += lag.count
        return merged.as_dict()

    def figures(self, wall_s: float) -> dict[str, Any]:
        frames = self.frames
        new_frames = frames - (self.resumed_from or 0)
        return {
            "frames": frames,
            "resumed_from": self.resumed_from,
            "wall_s": round(wall_s, 3),
            "frames_per_s": round(new_frames / wall_s, 1) if wall_s > 0 else 0.0,
            "episodes": self.episodes,
            "optim_steps": self.optim_steps,
            "optim_steps_per_s": round(self.optim_steps / wall_s, 1) if wall_s > 0 else 0.0,
            "learner": self.learner,
            "policy_version": self.policy_version,
            "loss_last": self.loss_last,
            "eval_return_last": self.eval_return_last,
            "eval_return_best": self.eval_return_best,
            "evals": self.evals,
            "solved": self.solved,
            "frames_to_solve": self.frames_to_solve,
            "wall_s_to_solve": None if self.wall_s_to_solve is None else round(self.wall_s_to_solve, 3),
            "policy_lag": self.lag.as_dict(),
            "batch_policy_age": self.batch_age.as_dict(),
        }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, payload: dict[str, Any], *, advice: str = "free space and run again") -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file.

    A full disk raises :class:`~streamrl.errors.DiskFull` naming ``path`` (with ``advice``: what to do), and the
    temporary file is removed: the old file, if any, stays whole, and no ``*.tmp`` is left behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with on_disk_full(path, advice):
            with open(tmp, "w") as f:
                json.dump(_clean(payload), f, indent=2, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
