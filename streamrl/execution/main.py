"""The driver: run a pipeline from the main process; one failure cancels all, graceful stop, a summary on every exit
path.

::

    result = streamrl.run(pipeline, run_dir="runs/dqn", seed=0, device="auto")
    print(result.summary["frames_per_s"], result.exit_reason)

What happens:

1. ``pipeline.validate()``; the main process's share runs through
   :class:`~streamrl.execution.process.ProcessRun` (the same code every worker process runs): streams are created
   for every edge; hooks ``start``.
2. Every stage of the main process runs as a task of one task group; every worker process (each replica of a
   replicated group is one) is a task that owns a child process and bridges its edges
   (:class:`~streamrl.execution.worker.WorkerGroup`); lossy hooks drain in their own tasks.
3. The run ends when every stage returned (sources hit their frame budget and the rest drained), or:

   * a stage raises → every other stage is cancelled, the run raises :class:`StageFailed` naming the stage,
     with the original exception as its cause;
   * a stop is requested (SIGINT/SIGTERM, or a hook such as a solved evaluation) → sources return at their
     next chunk, the pipeline drains for up to ``drain_timeout`` seconds, then what is left is cancelled;
   * a second SIGINT/SIGTERM ends the run now, however slow its hooks: the stages and the lossy hooks'
     deliveries are cancelled (their buffered events are dropped and counted), and the closes still to run share
     ``HURRY_S`` (one second, :mod:`streamrl.execution.context`); a worker process that has not exited by then is
     killed. With
     ``exit_after_second_signal`` (what ``streamrl run`` passes), the process also exits by then whatever holds it:
     a hook whose synchronous code blocks the event loop keeps the loop from even noticing the signal, so a
     signal handler that runs between bytecodes arms a timer that ends the process with ``os._exit`` (the store
     keeps its committed rows, the previous checkpoint stays; see :class:`_SecondSignalBackstop`).

4. On every exit path, shielded from cancellation: each stage's ``close`` (the replay store flushes; 60 s at
   most), each hook's ``close`` (metrics, checkpoint; 120 s at most), then ``summary.json`` with the run's
   figures, per-stream statistics and per-stage busy fractions naming the bottleneck, and for replicated groups
   frames, busy fractions and policy lag per replica (``replicas``).

A process in which no stage trains (``Stage.needs_grad``) runs in ``torch.inference_mode()`` from start to end.
Each worker process uses one torch thread; when there are workers, the main process uses the remaining cores.
During a run the cyclic garbage collector is calmed (:func:`calm_gc`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch

from streamrl.errors import DiskFull, PipelineError
from streamrl.events import EventBus
from streamrl.execution.context import RunContext, resolve_device
from streamrl.execution.process import ProcessRun, calm_gc, loop_options
from streamrl.execution.ray_actor import ray_replicas, ray_session
from streamrl.execution.status import StatusWriter, bottleneck, run_statistics
from streamrl.execution.worker import WorkerGroup
from streamrl.pipeline import MAIN, Pipeline
from streamrl.rundir import resume_advice
from streamrl.seeding import restore_rng, seed_everything
from streamrl.summary import RunRecorder, write_json

log = structlog.get_logger("streamrl.execution")
EXIT_AFTER_SECOND_SIGNAL_S = 1.5  # streamrl run: the process is gone by then, whatever blocks the event loop


@dataclass
class RunResult:
    """What :func:`run` returns: the summary written to ``summary.json`` and how the run ended."""

    summary: dict[str, Any]
    exit_reason: str  # "completed", "stopped", "interrupted", "terminated"
    run_dir: Path
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal else 0


class _SecondSignalBackstop:
    """Ends the process ``after_s`` seconds after a second SIGINT/SIGTERM, whatever blocks the event loop.

    The event loop learns of a signal through its wakeup file descriptor, so a hook whose synchronous code blocks
    the loop (a ``time.sleep``, a slow upload in ``on_event`` or ``close``) keeps the loop from handling a second
    Ctrl-C until it returns. A Python-level signal handler runs in the main thread between bytecodes, blocked loop
    or not: this one counts the signals (then calls the loop's own no-op handler) and at the second arms a daemon
    timer that flushes stdout/stderr and calls ``os._exit(128 + first signal)``. When the run finishes first (its
    summary written), the timer only cuts a slow interpreter teardown short. The store keeps every committed row
    and the previous checkpoint stays, as after ``kill -9``. Only ``streamrl run`` installs it: a library caller's
    process is never ended by streamrl.
    """

    def __init__(self, run: RunContext, after_s: float) -> None:
        self.run = run
        self.after_s = after_s
        self.signals: list[int] = []
        self.loop_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.loop_handlers:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        if len(self.signals) == 2:
            timer = threading.Timer(self.after_s, self._exit)
            timer.daemon = True
            timer.start()
        handler = self.loop_handlers.get(signal.Signals(signum))
        if callable(handler):
            handler(signum, frame)

    def _exit(self) -> None:
        if not self.run.summary_written:
            print(f"streamrl: still not ended {self.after_s:g} s after the second signal (a hook or a stage blocks "
                  "the event loop): exiting now; the store keeps its committed rows, resume from the last "
                  "checkpoint", file=sys.stderr)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(128 + self.signals[0])


async def _watch_signals(run: RunContext, received: list[int], exit_after_second_signal: float | None = None, *,
                         task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """SIGINT/SIGTERM: the first stops the run (drain), the second ends it now (:meth:`RunContext.hurry`). The
    receiver stays open until the summary is written, so a signal during the flush is noted instead of killing the
    process mid-write. With ``exit_after_second_signal``, :class:`_SecondSignalBackstop` bounds the second signal's
    wait even when the event loop is blocked."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if exit_after_second_signal is not None:  # after the receiver: it wraps the loop's handlers
            _SecondSignalBackstop(run, exit_after_second_signal)
        task_status.started()
        async for signum in signals:
            received.append(signum)
            if len(received) > 1:
                log.warning("second signal: ending now; the store, hooks and summary get a second", signal=signum)
                run.hurry()
            elif run.finalizing:
                log.warning("already stopping; flushing the store, metrics and checkpoint first (send it again to "
                            "cut that short)", signal=signum)
            else:
                name = "interrupted" if signum == signal.SIGINT else "terminated"
                log.warning("stop requested by signal; draining (send it again to end at once)", signal=signum)
                run.request_stop(name)


async def run_async(
    pipeline: Pipeline,
    run_dir: str | Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    handle_signals: bool = True,
    drain_timeout: float = 5.0,
    preload: list[tuple[str, str]] | None = None,
    resume: dict[str, Any] | None = None,
    exit_after_second_signal: float | None = None,
    deterministic: bool = False,
    ray_address: str | None = None,
) -> RunResult:
    """Run ``pipeline`` inside the current event loop; see the module docstring.

    ``resume``: a checkpoint (:func:`streamrl.resume.load_checkpoint`) already loaded into the pipeline's stages
    and hooks (:func:`streamrl.resume.restore`); the run continues its frame count and RNG streams.
    ``exit_after_second_signal``: seconds after a second SIGINT/SIGTERM by which the *process* exits, whatever
    blocks the event loop (``streamrl run`` passes :data:`EXIT_AFTER_SECOND_SIGNAL_S`; None: never end it).
    ``deterministic``: the same graph in a fixed schedule (:func:`one_schedule`): two runs with one seed write the
    same ``metrics.csv``, on the CPU.
    ``ray_address``: the Ray cluster a pipeline with ``ray_actor`` groups joins (default: the one this process is
    connected to, else ``RAY_ADDRESS``, else a local instance started for the run;
    :func:`~streamrl.execution.ray_actor.ray_session`).
    """
    if deterministic:
        one_schedule(pipeline)
    pipeline.validate()
    handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
    with torch.inference_mode(not any(s.needs_grad for s in pipeline.stages_in(MAIN))), calm_gc(), \
            _deterministic_torch(deterministic), ray_session(pipeline, ray_address):
        return await _run_validated(pipeline, run_dir, seed=seed, device=device, handle_signals=handle_signals,
                                    drain_timeout=drain_timeout, preload=preload, resume=resume,
                                    exit_after_second_signal=exit_after_second_signal, deterministic=deterministic)


def one_schedule(pipeline: Pipeline) -> None:
    """Make ``pipeline`` run deterministically: every group in the main process (one event loop, whose ready queue
    is first in, first out), so the order in which stages run depends on nothing but the data. With it the run
    steps envs in this process (no subprocess workers), does blocking work inline instead of in threads, commits
    the store on flushes only (no timer), counts time in events (1 ms each), and uses torch's deterministic
    algorithms on one thread. Replicated groups need processes of their own: refused."""
    for group in pipeline.worker_groups():
        if pipeline.replicas_of(group) > 1:
            raise PipelineError(f"deterministic mode runs one process; group {group!r} has "
                                f"{pipeline.replicas_of(group)} replicas, each a process: use replicas=1")
        pipeline.place(group, "in_process")


@contextlib.contextmanager
def _deterministic_torch(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    algorithms, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms)
        torch.set_num_threads(threads)


async def _run_validated(
    pipeline: Pipeline,
    run_dir: str | Path,
    *,
    seed: int,
    device: str | torch.device,
    handle_signals: bool,
    drain_timeout: float,
    preload: list[tuple[str, str]] | None,
    resume: dict[str, Any] | None,
    exit_after_second_signal: float | None,
    deterministic: bool = False,
) -> RunResult:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    recorder = RunRecorder()
    if resume is not None:
        restore_rng(resume["rng"])
        recorder.frames_by_source.update(resume["progress"])  # hooks schedule from the resumed frame count
        recorder.resumed_from = resume["frames"]
    # a resumed run's clock goes on from the checkpoint's, so event times and metrics rows continue
    bus = EventBus(clock_start=None if resume is None else time.perf_counter() - resume["wall_s"],
                   logical=deterministic)
    bus.subscribe(recorder.on_event, ("chunk", "optim_step", "weights", "eval", "learner", "replay_device"),
                  name="recorder")
    run = RunContext(run_dir, bus=bus, device=resolve_device(device), seed=seed, pipeline=pipeline,
                     recorder=recorder, deterministic=deterministic)
    process = ProcessRun(pipeline, run)
    places = [(group, r) for group in pipeline.worker_groups() if group not in pipeline.ray_groups()
              for r in range(pipeline.replicas_of(group))]
    workers = [WorkerGroup(pipeline, group, r, process.wiring, run, index=i, preload=preload or [])
               for i, (group, r) in enumerate(places)]
    if pipeline.ray_groups():  # Ray actors: the same handles, on Ray (streamrl.execution.ray_actor)
        workers += ray_replicas(pipeline, process.wiring, run, len(workers), preload or [])
    threads = torch.get_num_threads()
    local = [w for w in workers if pipeline.groups[w.group] == "worker_process"]
    if local:  # each worker process takes a core (one torch thread); the main process keeps the rest
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - sum(w.threads for w in local)))
    received_signals: list[int] = []
    started = time.perf_counter()

    async def announce() -> None:
        await bus.publish("run_start", pipeline.name,
                          {"run_dir": str(run.run_dir), "seed": run.seed, "device": str(run.device)})

    status = StatusWriter(run, process, workers)  # status.json, about once a second, for streamrl top
    async with anyio.create_task_group() as guard:
        if handle_signals:  # started first and stopped last: signals are handled until the summary is written
            await guard.start(_watch_signals, run, received_signals, exit_after_second_signal)
        guard.start_soon(status.run)
        try:
            error = await process.execute(partners=[w.run for w in workers] + process.wiring.tasks,
                                          on_started=announce, drain_timeout=drain_timeout)
            summary, error = _finish(pipeline, run, process, workers, time.perf_counter() - started,
                                     received_signals, error)
            status.write_final(summary)
        finally:
            guard.cancel_scope.cancel()
            torch.set_num_threads(threads)
    if error is not None:
        raise error
    return RunResult(summary, summary["exit_reason"], run_dir, received_signals[0] if received_signals else None)


def _finish(pipeline: Pipeline, run: RunContext, process: ProcessRun, workers: list[WorkerGroup], wall: float,
            received_signals: list[int], error: BaseException | None) -> tuple[dict[str, Any], BaseException | None]:
    """Write ``summary.json``; return it and the run's error (a full disk, when the summary found no room)."""
    if received_signals:
        exit_reason = "interrupted" if received_signals[0] == signal.SIGINT else "terminated"
    elif error is not None:
        exit_reason = "failed"
    elif run.stopping:
        exit_reason = "stopped"
    else:
        exit_reason = "completed"
    summary = _summary(pipeline, run, process, workers, wall, exit_reason, error)
    try:
        write_json(run.run_dir / "summary.json", summary, advice=resume_advice(run.run_dir))
        run.summary_written = True
    except DiskFull as exc:  # no room for the summary either: say so, and fail with the first error
        print(f"streamrl: could not write summary.json: {exc}", file=sys.stderr)
        error = error or exc
    return summary, error


def _summary(pipeline: Pipeline, run: RunContext, process: ProcessRun, workers: list[WorkerGroup], wall: float,
             exit_reason: str, error: BaseException | None) -> dict[str, Any]:
    figures = run_statistics(process, workers)
    streams, busy = figures["streams"], figures["busy"]
    summary = run.recorder.figures(wall)
    summary.update(
        {
            "pipeline": pipeline.name,
            "exit_reason": exit_reason,
            "stop_reason": run.stop_reason,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "seed": run.seed,
            "device": str(run.device),
            "streams": streams,
            "stages": {"busy_fraction": busy, "bottleneck": bottleneck(busy)},
            "hooks": run.bus.statistics(),
        }
    )
    replicas = _replicas(pipeline, run, busy, workers)
    if replicas:
        summary["replicas"] = replicas
        nodes = _nodes(replicas)
        if nodes:
            summary["nodes"] = nodes
    return summary


def _replicas(pipeline: Pipeline, run: RunContext, busy: dict[str, float],
              workers: list[WorkerGroup]) -> dict[str, dict[str, Any]]:
    """Per replica of each replicated (or Ray) group: frames, busy fraction of each stage, policy lag of its
    chunks; for Ray replicas also the node, restarts, bytes moved and object-store waits."""
    out: dict[str, dict[str, Any]] = {}
    telemetry = {w.label: w.telemetry() for w in workers}
    for group in pipeline.worker_groups():
        replicated = pipeline.replicas_of(group) > 1
        if not replicated and group not in pipeline.ray_groups():
            continue
        for r in range(pipeline.replicas_of(group)):
            label = pipeline.replica_label(group, r)
            labels = [pipeline.replica_label(name, r) for name, g in pipeline.stage_group.items() if g == group]
            out[label] = {
                "frames": sum(run.recorder.frames_by_source.get(stage, 0) for stage in labels),
                "busy_fraction": {stage: busy[stage] for stage in labels if stage in busy},
                "policy_lag": run.recorder.lag_of(labels),
                **telemetry.get(label, {}),
            }
    return out


def _nodes(replicas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per node of a Ray cluster (by node id): its IP, the replicas whose last actor ran there, their frames (all of
    a replica's frames go to the node of its last actor), bytes moved each way, restarts, object-store waits, the
    busy fraction of each of their stages and the mean policy lag of their chunks."""
    nodes: dict[str, dict[str, Any]] = {}
    for label, figures in replicas.items():
        if figures.get("node_id") is None:
            continue
        node = nodes.setdefault(figures["node_id"], {
            "ip": figures["node"], "replicas": [], "frames": 0, "bytes_in": 0, "bytes_out": 0, "restarts": 0,
            "object_store_wait_s": 0.0, "busy_fraction": {}, "policy_lag_mean": None})
        node["replicas"].append(label)
        for key in ("frames", "bytes_in", "bytes_out", "restarts", "object_store_wait_s"):
            node[key] += figures[key]
        node["busy_fraction"].update(figures["busy_fraction"])
    for node in nodes.values():
        lags = [lag["mean"] for r in node["replicas"] if (lag := replicas[r].get("policy_lag") or {}).get("mean")
                is not None]
        node["policy_lag_mean"] = round(sum(lags) / len(lags), 3) if lags else None
        node["object_store_wait_s"] = round(node["object_store_wait_s"], 4)
    return nodes


def run(pipeline: Pipeline, run_dir: str | Path, **options: Any) -> RunResult:
    """Run ``pipeline`` to completion in a fresh event loop (asyncio backend); ``options`` are the keywords of
    :func:`run_async` (``seed``, ``device``, ``handle_signals``, ``resume``, ``deterministic``...)."""
    result: RunResult = anyio.run(functools.partial(run_async, pipeline, run_dir, **options), backend="asyncio",
                                  backend_options=loop_options())
    return result


