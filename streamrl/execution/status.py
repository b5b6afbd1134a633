"""A live status file of a running pipeline: ``<run_dir>/status.json``, refreshed about once a second.

``summary.json`` names the bottleneck once a run has ended; ``status.json`` shows it while the run goes on, for
``streamrl top RUN_DIR`` (:mod:`streamrl.top`) or any tool that reads JSON::

    $ python -c 'import json; s = json.load(open("runs/dqn/status.json")); print(s["state"], s["frames_per_s"])'
    running 10234.5

The runtime (:mod:`streamrl.execution.main`) starts one :class:`StatusWriter` per run beside its stages::

    status = StatusWriter(run, process, workers)
    task_group.start_soon(status.run)   # writes status.json now, then every ``interval`` seconds
    ...                                 # the run ends, summary.json is written
    status.write_final(summary)         # the last status: the exit reason, the figures of summary.json

What the file holds (every rate is *recent*, over the last ``window`` seconds, beside the run's overall figure):

* ``state``: ``"running"`` while the run goes on (``phase`` says ``"running"``, ``"stopping"`` (draining after a
  stop request) or ``"closing"`` (stages ended; the store, hooks and summary close)), then the exit reason
  (``"completed"``, ``"stopped"``, ``"interrupted"``, ``"terminated"``, ``"failed"``);
* ``wall_s``, ``frames``, ``frames_per_s`` (recent) and ``frames_per_s_overall``; ``optim_steps`` and the
  learner's ``updates_per_s``; ``policy_lag`` (mean over recent chunks, overall mean and max);
  ``eval_return_last``/``eval_return_best``, ``last_episode_return``;
* ``stages``: per stage (``env[2]`` for replica 2), its ``process``, ``busy`` fraction (recent; ``None`` for a
  worker process's stage until the worker reports at its end), ``busy_overall``, and where the stage publishes
  chunks, its ``frames`` and ``frames_per_s``; ``bottleneck``: the busiest stage;
* ``streams``: per stream of the main process (a worker's own streams once it ended), ``depth`` against
  ``capacity``, ``items_per_s``, ``producer_wait`` (share of the window its producer waited for room) and
  ``backpressure``: the stream is full or nearly full (80 %) and its producer waited for room (10 % of the
  window or more), or its producer waited over half the window (a rendezvous stream, capacity 0, is never full);
  a lossy stream (``overflow="drop_oldest"``, the learner's weights) never holds its producer back. A worker's
  own streams have no recent figures (``None``): they arrive when it ends;
* ``replicas``: per replica of a replicated group, its frames, frames/s and policy lag.

The cost is one snapshot of counters the runtime keeps anyway and one small JSON file per ``interval``: nothing
runs per step. The file is replaced atomically (temporary file + ``os.replace``), never fsynced (a status that a
crash loses is rewritten a second later); a failed write (a full disk) is logged once and never fails the run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

if TYPE_CHECKING:
    from streamrl.execution.context import RunContext
    from streamrl.execution.process import ProcessRun
    from streamrl.execution.worker import WorkerGroup

log = structlog.get_logger("streamrl.execution")
STATUS_FILE = "status.json"
STATUS_VERSION = 1
NEARLY_FULL = 0.8  # a stream this full (or fuller) is marked as backpressure
WAITED_TOO_LONG = 0.5  # a producer that waited this share of the window is held back: backpressure
WAITED_SOME = 0.1  # ... or this share, while its stream is (nearly) full


@dataclass
class _Sample:
    """The run's counters at one instant; rates are differences of two samples."""

    t: float
    frames: int
    optim_steps: int
    lag_total: float
    lag_count: int
    by_source: dict[str, int] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)  # seconds each main-process stage has been busy
    streams: dict[str, tuple[int, float]] = field(default_factory=dict)  # items sent, producer wait (s)


def run_statistics(process: ProcessRun, workers: list[WorkerGroup]) -> dict[str, dict[str, Any]]:
    """The streams and busy fractions of the main process and of its workers (a worker reports its own when it
    ends): what ``summary.json`` and ``status.json`` show."""
    figures = process.statistics()
    for worker in workers:
        for part in ("streams", "busy"):
            figures[part].update(worker.statistics.get(part, {}))
    return figures


def bottleneck(busy: dict[str, float]) -> str | None:
    """The busiest stage."""
    return max(busy, key=lambda k: busy[k]) if busy else None


def _rate(new: float, old: float, dt: float) -> float | None:
    return round((new - old) / dt, 2) if dt > 0 else None


class StatusWriter:
    """Writes ``<run_dir>/status.json`` every ``interval`` seconds while a run lasts; see the module docstring."""

    def __init__(self, run: RunContext, process: ProcessRun, workers: list[WorkerGroup], *,
                 interval: float = 1.0, window: float = 5.0) -> None:
        self.run_ctx = run
        self.process = process
        self.workers = workers
        self.interval = interval
        self.window = window
        self.path = Path(run.run_dir) / STATUS_FILE
        self.started = time.perf_counter()
        self.finished = False
        self._failed_write = False
        self._ended: set[str] = set()  # main-process stages that returned
        pipeline = run.pipeline
        self._lossy = {name for e in pipeline.edges if e.overflow != "block"
                       for name in (e.stream_name, f"{e.name} (outbound)")}
        self._labels: dict[str, str] = {}  # every stage's label -> the process it runs in
        for name in pipeline.stages:
            group = pipeline.process_of(name)
            for r in range(pipeline.replicas_of(group)):
                self._labels[pipeline.replica_label(name, r)] = group
        self._samples: deque[_Sample] = deque([self._sample(self.started, run_statistics(process, workers)["streams"])])

    async def run(self) -> None:
        """Write the status now, then every ``interval`` seconds, until cancelled (the runtime does at the end)."""
        while not self.finished:
            status = self.snapshot()
            self.write(status)
            if not self.run_ctx.bus.logical:  # timer-driven events would shift a deterministic run's event clock
                await self.run_ctx.bus.publish("status", "runtime", status)
            await anyio.sleep(self.interval)

    def write_final(self, summary: dict[str, Any]) -> None:
        """The last status: ``state`` is the exit reason; figures, streams, busy fractions and replicas are the
        summary's (the worker processes' included)."""
        self.finished = True
        streams = dict(summary.get("streams", {}))
        stages = summary.get("stages", {})
        status = self.snapshot(streams=streams, busy_overall=stages.get("busy_fraction", {}), final=True)
        status.update(
            state=summary.get("exit_reason", "completed"), phase="ended", stop_reason=summary.get("stop_reason"),
            error=summary.get("error"), wall_s=summary.get("wall_s", status["wall_s"]),
            frames=summary.get("frames", status["frames"]),
            frames_per_s_overall=summary.get("frames_per_s", status["frames_per_s_overall"]),
            bottleneck=stages.get("bottleneck", status["bottleneck"]),
        )
        if summary.get("replicas"):
            for label, figures in summary["replicas"].items():
                status["replicas"].setdefault(label, {}).update(figures)
        self.write(status)

    def write(self, status: dict[str, Any]) -> None:
        """Replace ``status.json`` atomically; a failure is logged once, never raised."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(_finite(status), indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._failed_write:
                log.warning("could not write status.json; streamrl top will show a stale status", error=repr(exc))
                self._failed_write = True
            tmp.unlink(missing_ok=True)

    # -- snapshots --------------------------------------------------------------------------------------------
    def _busy_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for ctx in self.process.contexts:
            if ctx.ended_at is not None:
                self._ended.add(ctx.name)
            if ctx.started_at is not None:
                end = ctx.ended_at if ctx.ended_at is not None else time.perf_counter()
                out[ctx.name] = ctx.busy_fraction() * (end - ctx.started_at)
        return out

    def _sample(self, now: float, streams: dict[str, dict[str, Any]] | None = None) -> _Sample:
        recorder = self.run_ctx.recorder
        return _Sample(
            t=now, frames=recorder.frames, optim_steps=recorder.optim_steps, lag_total=recorder.lag.total,
            lag_count=recorder.lag.count, by_source=dict(recorder.frames_by_source), busy_s=self._busy_seconds(),
            streams={name: (s["items_sent"], s["producer_wait_s"]) for name, s in (streams or {}).items()},
        )

    def snapshot(self, *, streams: dict[str, dict[str, Any]] | None = None,
                 busy_overall: dict[str, float] | None = None, final: bool = False) -> dict[str, Any]:
        """The status now (rates over the last ``window`` seconds); ``streams``/``busy_overall`` replace the live
        figures (the final status passes the summary's)."""
        now = time.perf_counter()
        run, recorder = self.run_ctx, self.run_ctx.recorder
        if streams is None or busy_overall is None:
            live = run_statistics(self.process, self.workers)
            streams = live["streams"] if streams is None else streams
            busy_overall = live["busy"] if busy_overall is None else busy_overall
        new = self._sample(now, streams)
        while len(self._samples) > 1 and self._samples[1].t <= now - self.window:
            self._samples.popleft()
        old = self._samples[0]
        dt = new.t - old.t
        self._samples.append(new)
        wall = now - self.started

        stages: dict[str, dict[str, Any]] = {}
        for label, group in self._labels.items():
            busy = None
            if label in new.busy_s and dt > 0:
                busy = round(min(1.0, max(0.0, (new.busy_s[label] - old.busy_s.get(label, 0.0)) / dt)), 4)
            overall = busy_overall.get(label)
            entry: dict[str, Any] = {"process": group, "busy": overall if final or busy is None else busy,
                                     "busy_overall": overall, "ended": final or label in self._ended}
            if label in new.by_source:
                entry["frames"] = new.by_source[label]
                entry["frames_per_s"] = _rate(new.by_source[label], old.by_source.get(label, 0), dt)
            stages[label] = entry
        busy_now = {label: s["busy"] for label, s in stages.items() if s["busy"] is not None}

        stream_view: dict[str, dict[str, Any]] = {}
        for name, s in streams.items():
            capacity, depth = int(s["capacity"]), int(s["depth"])
            lossy = _base_name(name) in self._lossy or name.endswith("(latest)") or bool(s.get("dropped"))
            full = capacity > 0 and depth >= math.ceil(NEARLY_FULL * capacity)
            items_per_s = waited = None  # a worker's stream, first seen when it ended: no recent figures
            if name in old.streams and dt > 0:
                sent_then, waited_then = old.streams[name]
                items_per_s = _rate(s["items_sent"], sent_then, dt)
                waited = round(min(1.0, max(0.0, (s["producer_wait_s"] - waited_then) / dt)), 4)
            held = waited or 0.0
            stream_view[name] = {
                "depth": depth, "capacity": capacity, "max_depth": s.get("max_depth"), "lossy": lossy,
                "items_sent": s["items_sent"], "items_per_s": items_per_s, "producer_wait": waited,
                "dropped": s.get("dropped", 0),
                # full and its producer held back, or held back most of the window (a rendezvous stream is
                # never "full"); a sampled depth alone flickers on a stream of capacity 1
                "backpressure": not lossy and not final and (held > WAITED_TOO_LONG or (full and held > WAITED_SOME)),
            }

        lag_n = new.lag_count - old.lag_count
        lag = recorder.lag.as_dict()
        status: dict[str, Any] = {
            "version": STATUS_VERSION,
            "pipeline": run.pipeline.name,
            "state": "running",
            "phase": "closing" if run.finalizing else "stopping" if run.stopping else "running",
            "stop_reason": run.stop_reason,
            "updated_at": round(time.time(), 3),
            "interval_s": self.interval,
            "window_s": round(dt, 3),
            "wall_s": round(wall, 3),
            "frames": new.frames,
            "frames_per_s": _rate(new.frames, old.frames, dt),
            "frames_per_s_overall": round((new.frames - (recorder.resumed_from or 0)) / wall, 1) if wall else 0.0,
            "optim_steps": new.optim_steps,
            "updates_per_s": _rate(new.optim_steps, old.optim_steps, dt),
            "policy_version": recorder.policy_version,
            "policy_lag": {"recent": round((new.lag_total - old.lag_total) / lag_n, 3) if lag_n else None,
                           "mean": lag["mean"], "max": lag["max"]},
            "episodes": recorder.episodes,
            "last_episode_return": recorder.last_episode_return,
            "eval_return_last": recorder.eval_return_last,
            "eval_return_best": recorder.eval_return_best,
            "evals": recorder.evals,
            "bottleneck": bottleneck(busy_now),
            "stages": stages,
            "streams": stream_view,
            "replicas": self._replicas(new, old, dt),
        }
        return status

    def _replicas(self, new: _Sample, old: _Sample, dt: float) -> dict[str, dict[str, Any]]:
        """Per replica of each replicated group: frames, frames/s and the policy lag of its chunks."""
        pipeline, recorder = self.run_ctx.pipeline, self.run_ctx.recorder
        out: dict[str, dict[str, Any]] = {}
        for group in pipeline.worker_groups():
            n = pipeline.replicas_of(group)
            for r in range(n if n > 1 else 0):
                labels = [label for label, g in self._labels.items() if g == group and label.endswith(f"[{r}]")]
                frames = sum(new.by_source.get(label, 0) for label in labels)
                out[f"{group}[{r}]"] = {
                    "frames": frames,
                    "frames_per_s": _rate(frames, sum(old.by_source.get(label, 0) for label in labels), dt),
                    "policy_lag": recorder.lag_of(labels),
                }
        return out


def _base_name(stream: str) -> str:
    """A worker replica's stream ``"env.chunks [2]"`` is the edge's stream ``"env.chunks"``."""
    head, _, tail = stream.rpartition(" [")
    return head if head and tail.endswith("]") and tail[:-1].isdigit() else stream


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

