"""Run a pipeline: one task group, one failure cancels all, graceful stop, a summary on every exit path.

::

    result = streamrl.run(pipeline, run_dir="runs/dqn", seed=0, device="auto")
    print(result.summary["frames_per_s"], result.exit_reason)

What happens:

1. ``pipeline.validate()``; streams are created for every edge; hooks ``start``.
2. Every stage of the main process runs as a task of one task group; every worker group is a task that owns a
   child process and bridges its edges; lossy hooks drain in their own tasks.
3. The run ends when every stage returned (sources hit their frame budget and the rest drained), or:

   * a stage raises → every other stage is cancelled, the run raises :class:`StageFailed` naming the stage,
     with the original exception as its cause;
   * a stop is requested (SIGINT/SIGTERM, or a hook such as a solved evaluation) → sources return at their
     next chunk, the pipeline drains for up to ``drain_timeout`` seconds, then what is left is cancelled;
   * a second SIGINT/SIGTERM ends the run now, however slow its hooks: the stages and the lossy hooks'
     deliveries are cancelled (their buffered events are dropped and counted), and the closes still to run share
     ``HURRY_S`` (one second); a worker process that has not exited by then is killed. With
     ``exit_after_second_signal`` (what ``streamrl run`` passes), the process also exits by then whatever holds it:
     a hook whose synchronous code blocks the event loop keeps the loop from even noticing the signal, so a
     signal handler that runs between bytecodes arms a timer that ends the process with ``os._exit`` (the store
     keeps its committed rows, the previous checkpoint stays; see :class:`_SecondSignalBackstop`).

4. On every exit path, shielded from cancellation: each stage's ``close`` (the replay store flushes; 60 s at
   most), each hook's ``close`` (metrics, checkpoint; 120 s at most), then ``summary.json`` with the run's
   figures, per-stream statistics and per-stage busy fractions naming the bottleneck.

A process in which no stage trains (``Stage.needs_grad``) runs in ``torch.inference_mode()`` from start to end.
Each worker process uses one torch thread; when there are workers, the main process uses the remaining cores.
During a run the cyclic garbage collector is calmed (:func:`calm_gc`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog
import torch

from streamrl.errors import BrokenStreamError, DiskFull, StageFailed, StreamError, WorkerDied
from streamrl.events import EventBus, Hook
from streamrl.pipeline import MAIN, Pipeline
from streamrl.rundir import resume_advice
from streamrl.stages.base import Stage, StageContext
from streamrl.summary import RunRecorder, write_json
from streamrl.wiring import Wiring, wire

log = structlog.get_logger("streamrl.runtime")
HURRY_S = 1.0  # seconds the closes left get in all after a second Ctrl-C: the process exits well within 2 s
EXIT_AFTER_SECOND_SIGNAL_S = 1.5  # streamrl run: the process is gone by then, whatever blocks the event loop


def loop_options() -> dict[str, Any]:
    """Run on uvloop when it is installed: its event loop does the per-step scheduling in C."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


@contextlib.contextmanager
def calm_gc(threshold: int = 50_000) -> Iterator[None]:
    """Keep the cyclic garbage collector out of the hot loops while a run lasts.

    Everything built before the run (modules, envs, buffers) is frozen out of the collector's scans (no collection
    first: a full collection of a heap holding torch costs ~0.1 s), and young
    objects are collected every ``threshold`` allocations instead of 700: the per-step objects (futures, small
    tensors) die by reference counting anyway. Both are restored when the run ends.
    """
    freeze = gc.get_freeze_count() == 0  # leave a caller's own freeze alone
    if freeze:
        gc.freeze()
    previous = gc.get_threshold()
    gc.set_threshold(threshold, previous[1], previous[2])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        if freeze:
            gc.unfreeze()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global RNG states, as tensors and plain containers (a checkpoint loads them
    with ``torch.load(weights_only=True)``: numpy's key array travels as an int64 tensor)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def restore_rng(state: dict[str, Any]) -> None:
    """Set torch's, numpy's and Python's RNGs to what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])


class RunContext:
    """Shared by the stages and hooks of one process: run directory, device, seed, bus, stop flag."""

    def __init__(
        self,
        run_dir: Path,
        *,
        bus: EventBus,
        device: torch.device,
        seed: int,
        config: Any = None,
        process: str = MAIN,
        recorder: RunRecorder | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.bus = bus
        self.device = device
        self.seed = seed
        self.config = config
        self.process = process
        self.recorder = recorder
        self.pipeline = pipeline  # the main process's: what a checkpoint saves
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

    def elapsed(self) -> float:
        return self.bus.now()


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


async def _run_stage(stage: Stage, ctx: StageContext) -> None:
    ctx.started_at = time.perf_counter()
    try:
        await stage.run(ctx)
    except BrokenStreamError:
        pass  # the consumer finished: a normal end for a producer
    except StageFailed:
        raise
    except Exception as exc:
        raise StageFailed(stage.name, exc) from exc
    finally:
        ctx.ended_at = time.perf_counter()
        ctx.close_ports()


def _saw_its_stream_end(exc: BaseException) -> bool:
    """A stage that failed only because a stream ended under it (a neighbour failed or was cancelled and closed its
    ports): an echo of the failure to report, never the cause."""
    return isinstance(exc, StageFailed) and isinstance(exc.error, StreamError)


def _first_failure(exc: BaseException) -> BaseException:
    """Pick the error to report from a (nested) exception group: a dead worker process (the root cause of whatever
    its death made other stages raise), else a StageFailed, else the first that is not a cancellation."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = []
        stack: list[BaseException] = [exc]
        while stack:
            e = stack.pop(0)
            if isinstance(e, BaseExceptionGroup):
                stack.extend(e.exceptions)
            else:
                leaves.append(e)
        for kind in (WorkerDied, StageFailed):
            for leaf in sorted(leaves, key=_saw_its_stream_end):  # stable: the root cause before its echoes
                if isinstance(leaf, kind):
                    return leaf
        for leaf in leaves:
            if not isinstance(leaf, anyio.get_cancelled_exc_class()):
                return leaf
        return leaves[0]
    return exc


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
        handler = self.loop_handlers.get(signum)
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


async def _watch_stop(run: RunContext, stages_scope: anyio.CancelScope, drain_timeout: float) -> None:
    async def grace() -> None:
        await run.stop_event.wait()
        await anyio.sleep(drain_timeout)

    async with anyio.create_task_group() as tg:
        async def cancel_when(wait: Any) -> None:
            await wait()
            stages_scope.cancel()
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_when, grace)
        tg.start_soon(cancel_when, run.cancel_now.wait)


def _bottleneck(busy: dict[str, float]) -> str | None:
    return max(busy, key=lambda k: busy[k]) if busy else None


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
) -> RunResult:
    """Run ``pipeline`` inside the current event loop; see the module docstring.

    ``resume``: a checkpoint (:func:`streamrl.resume.load_checkpoint`) already loaded into the pipeline's stages
    and hooks (:func:`streamrl.resume.restore`); the run continues its frame count and RNG streams.
    ``exit_after_second_signal``: seconds after a second SIGINT/SIGTERM by which the *process* exits, whatever
    blocks the event loop (``streamrl run`` passes :data:`EXIT_AFTER_SECOND_SIGNAL_S`; None: never end it).
    """
    pipeline.validate()
    handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
    with torch.inference_mode(not any(s.needs_grad for s in pipeline.stages_in(MAIN))), calm_gc():
        return await _run_validated(pipeline, run_dir, seed=seed, device=device, handle_signals=handle_signals,
                                    drain_timeout=drain_timeout, preload=preload, resume=resume,
                                    exit_after_second_signal=exit_after_second_signal)


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
) -> RunResult:
    from streamrl.placement import WorkerGroup  # placement imports the runtime

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    recorder = RunRecorder()
    if resume is not None:
        restore_rng(resume["rng"])
        recorder.frames_by_source.update(resume["progress"])  # hooks schedule from the resumed frame count
        recorder.resumed_from = resume["frames"]
    # a resumed run's clock goes on from the checkpoint's, so event times and metrics rows continue
    bus = EventBus(clock_start=None if resume is None else time.perf_counter() - resume["wall_s"])
    bus.subscribe(recorder.on_event, ("chunk", "optim_step", "weights", "eval"), name="recorder")
    run = RunContext(run_dir, bus=bus, device=resolve_device(device), seed=seed, config=pipeline.config,
                     recorder=recorder, pipeline=pipeline)
    wiring: Wiring = wire(pipeline, MAIN)
    contexts = [
        StageContext(stage, run, wiring.inputs[stage.name], wiring.outputs[stage.name])
        for stage in pipeline.stages_in(MAIN)
    ]
    workers = [
        WorkerGroup(pipeline, group, wiring, run, index=i, preload=preload or [])
        for i, group in enumerate(pipeline.worker_groups())
    ]
    threads = torch.get_num_threads()
    if workers:  # each worker takes a core (one torch thread); the main process keeps the rest
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - sum(w.threads for w in workers)))
    hooks: list[Hook] = pipeline.hooks_in(MAIN)
    received_signals: list[int] = []
    started = time.perf_counter()
    async with anyio.create_task_group() as guard:
        if handle_signals:  # started first and stopped last: signals are handled until the summary is written
            await guard.start(_watch_signals, run, received_signals, exit_after_second_signal)
        try:
            error, summary = await _run_and_finalize(pipeline, run, contexts, workers, hooks, wiring,
                                                     received_signals, started, drain_timeout)
        finally:
            guard.cancel_scope.cancel()
            torch.set_num_threads(threads)
    if error is not None:
        raise error
    return RunResult(summary, summary["exit_reason"], run_dir, received_signals[0] if received_signals else None)


async def _run_and_finalize(
    pipeline: Pipeline,
    run: RunContext,
    contexts: list[StageContext],
    workers: list[Any],
    hooks: list[Hook],
    wiring: Wiring,
    received_signals: list[int],
    started: float,
    drain_timeout: float,
) -> tuple[BaseException | None, dict[str, Any]]:
    """Run the stages, then (shielded) close them and the hooks and write the summary; return the error."""
    bus = run.bus
    error: BaseException | None = None
    started_hooks: list[Hook] = []
    try:
        for hook in hooks:
            await hook.start(run)
            started_hooks.append(hook)
            bus.add_hook(hook)
        await bus.publish("run_start", pipeline.name,
                          {"run_dir": str(run.run_dir), "seed": run.seed, "device": str(run.device)})
        async with anyio.create_task_group() as outer:
            outer.start_soon(bus.drain_lossy, run.cancel_now)
            watch_scope = anyio.CancelScope()
            stages_scope = anyio.CancelScope()

            async def watch_stop() -> None:
                with watch_scope:
                    await _watch_stop(run, stages_scope, drain_timeout)

            outer.start_soon(watch_stop)
            try:
                with stages_scope:
                    async with anyio.create_task_group() as tg:
                        for ctx in contexts:
                            tg.start_soon(_run_stage, ctx.stage, ctx)
                        for worker in workers:
                            tg.start_soon(worker.run)
            finally:
                watch_scope.cancel()
                bus.close()
    except BaseException as exc:  # noqa: BLE001 - reported below, re-raised after the finalizers
        error = _first_failure(exc)
    finally:
        run.finalizing = True
        run.error = error  # a hook's close may depend on it (no checkpoint of a learner stopped by NaNs)
        with anyio.CancelScope(shield=True):
            close_errors = await _finalize(contexts, started_hooks, run)
    wall = time.perf_counter() - started
    if error is None and close_errors:
        error = close_errors[0]
    if received_signals:
        exit_reason = "interrupted" if received_signals[0] == signal.SIGINT else "terminated"
    elif error is not None:
        exit_reason = "failed"
    elif run.stopping:
        exit_reason = "stopped"
    else:
        exit_reason = "completed"
    assert run.recorder is not None
    summary = _summary(pipeline, run.recorder, wall, wiring, contexts, workers, bus, run, exit_reason, error)
    try:
        write_json(run.run_dir / "summary.json", summary, advice=resume_advice(run.run_dir))
        run.summary_written = True
    except DiskFull as exc:  # no room for the summary either: say so, and fail with the first error
        print(f"streamrl: could not write summary.json: {exc}", file=sys.stderr)
        error = error or exc
    return error, summary


async def _finalize(contexts: list[StageContext], hooks: list[Hook], run: RunContext) -> list[BaseException]:
    errors: list[BaseException] = []
    for ctx in contexts:
        try:
            await _bounded_close(run, 60, partial(ctx.stage.close, ctx), f"stage {ctx.name}")
        except Exception as exc:  # keep closing the others
            log.error("stage close failed", stage=ctx.name, error=repr(exc))
            errors.append(StageFailed(ctx.name, exc))
    for hook in reversed(hooks):
        try:
            await _bounded_close(run, 120, partial(hook.close, run), f"hook {hook.name}")
        except Exception as exc:
            log.error("hook close failed", hook=hook.name, error=repr(exc), traceback=traceback.format_exc())
            errors.append(StageFailed(f"hook {hook.name}", exc))
    return errors


async def _bounded_close(run: RunContext, seconds: float, close: Callable[[], Awaitable[None]], what: str) -> None:
    """Await ``close()`` for at most ``seconds`` (then ``TimeoutError``); once the run is hurried (a second signal,
    before or during the close), only until ``run.hurry_by``: cut short by the user, that is logged, not raised."""
    deadline = anyio.current_time() + seconds
    with anyio.CancelScope(deadline=deadline if run.hurry_by is None else min(deadline, run.hurry_by)) as scope:
        run.closing = scope
        try:
            await close()
        finally:
            run.closing = None
    if scope.cancelled_caught:
        if run.hurry_by is not None:
            log.warning("close cut short by the second signal", what=what)
            return
        raise TimeoutError(f"{what} did not close within {seconds} s")


def _summary(
    pipeline: Pipeline,
    recorder: RunRecorder,
    wall: float,
    wiring: Wiring,
    contexts: list[StageContext],
    workers: list[Any],
    bus: EventBus,
    run: RunContext,
    exit_reason: str,
    error: BaseException | None,
) -> dict[str, Any]:
    streams = {name: s.as_dict() for name, s in wiring.statistics().items()}
    busy = {ctx.name: round(ctx.busy_fraction(), 4) for ctx in contexts}
    for worker in workers:
        streams.update(worker.stream_statistics)
        busy.update(worker.busy)
    summary = recorder.figures(wall)
    summary.update(
        {
            "pipeline": pipeline.name,
            "exit_reason": exit_reason,
            "stop_reason": run.stop_reason,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "seed": run.seed,
            "device": str(run.device),
            "streams": streams,
            "stages": {"busy_fraction": busy, "bottleneck": _bottleneck(busy)},
            "hooks": bus.statistics(),
        }
    )
    return summary


def run(
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
) -> RunResult:
    """Run ``pipeline`` to completion in a fresh event loop (asyncio backend); see :func:`run_async`."""

    async def main() -> RunResult:
        return await run_async(
            pipeline, run_dir, seed=seed, device=device, handle_signals=handle_signals,
            drain_timeout=drain_timeout, preload=preload, resume=resume,
            exit_after_second_signal=exit_after_second_signal,
        )

    result: RunResult = anyio.run(main, backend="asyncio", backend_options=loop_options())
    return result


