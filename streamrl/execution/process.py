"""One process's stages and hooks, run the same way everywhere: :class:`ProcessRun`.

The main process (:mod:`streamrl.execution.main`), every worker process and every replica of a replicated group
(:mod:`streamrl.execution.worker`) and every Ray actor (:mod:`streamrl.execution.ray_actor`) run their share of a
pipeline through this one class::

    process = ProcessRun(pipeline, run)            # wires the streams of run.process, makes the stage contexts
    error = await process.execute(partners=[...])  # start hooks, run stages, close (shielded); the error, if any
    process.statistics()                           # per-stream counters and per-stage busy fractions

``execute`` does, in order:

1. start the process's hooks (each subscribed to the bus once started; ``on_started`` runs then, e.g. the main
   process publishes ``run_start``);
2. run every stage as a task of one task group, with the ``partners`` (tasks that are part of the run: the main
   process's worker groups) in the same group, and the ``companions`` (tasks that serve the stages: a worker's
   bridge) beside it; lossy hooks drain in their own tasks. A stage that raises cancels the others. A stop
   (:meth:`RunContext.request_stop`) lets sources return and the rest drain; with ``drain_timeout``, what has not
   drained after that many seconds is cancelled. :meth:`RunContext.hurry` cancels at once;
3. once the stages ended: close the bus (lossy hooks get what they buffered), await ``after_stages`` (a worker
   ships what is left), cancel the companions;
4. on every exit path, shielded from cancellation: close each stage (60 s at most) and each hook (120 s at most);
   after a second Ctrl-C the closes share :data:`~streamrl.execution.context.HURRY_S`.

The error returned is the one to report: a dead worker process before the stage failures it caused, a stage
failure before the failures of the stages whose streams ended under them (:func:`first_failure`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from functools import partial
from typing import Any

import anyio
import structlog

from streamrl.errors import BrokenStreamError, StageFailed, StreamError, WorkerDied
from streamrl.events import Hook
from streamrl.execution.context import RunContext
from streamrl.execution.wiring import Wiring, wire
from streamrl.pipeline import Pipeline
from streamrl.stages.base import Stage, StageContext

log = structlog.get_logger("streamrl.execution")
Task = Callable[[], Coroutine[Any, Any, Any]]
STAGE_CLOSE_S = 60.0
HOOK_CLOSE_S = 120.0


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


async def run_stage(stage: Stage, ctx: StageContext) -> None:
    """Run one stage; its failure becomes :class:`StageFailed` naming it; its ports close when it ends."""
    ctx.started_at = time.perf_counter()
    try:
        await stage.run(ctx)
    except BrokenStreamError:
        pass  # the consumer finished: a normal end for a producer
    except StageFailed:
        raise
    except Exception as exc:
        raise StageFailed(ctx.name, exc) from exc
    finally:
        ctx.ended_at = time.perf_counter()
        ctx.close_ports()


def _saw_its_stream_end(exc: BaseException) -> bool:
    """A stage that failed only because a stream ended under it (a neighbour failed or was cancelled and closed its
    ports): an echo of the failure to report, never the cause."""
    return isinstance(exc, StageFailed) and isinstance(exc.error, StreamError)


def first_failure(exc: BaseException) -> BaseException:
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


async def bounded_close(run: RunContext, seconds: float, close: Callable[[], Awaitable[None]], what: str) -> None:
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


class ProcessRun:
    """The stages and hooks of one process (``run.process``); see the module docstring."""

    def __init__(self, pipeline: Pipeline, run: RunContext) -> None:
        self.run = run
        self.wiring: Wiring = wire(pipeline, run.process)
        replicated = pipeline.replicas_of(run.process) > 1
        self.contexts = [
            StageContext(stage, run, self.wiring.inputs[stage.name], self.wiring.outputs[stage.name],
                         label=pipeline.replica_label(stage.name, run.replica))
            for stage in pipeline.stages_in(run.process)
        ]
        self.hooks: list[Hook] = pipeline.hooks_in(run.process)
        self.started_hooks: list[Hook] = []
        self._suffix = f" [{run.replica}]" if replicated else ""

    async def execute(
        self,
        *,
        partners: Sequence[Task] = (),
        companions: Sequence[Task] = (),
        on_started: Task | None = None,
        after_stages: Task | None = None,
        drain_timeout: float | None = None,
    ) -> BaseException | None:
        """Start the hooks, run the stages, close everything; return the error to report (None: a clean end)."""
        run = self.run
        error: BaseException | None = None
        try:
            for hook in self.hooks:
                await hook.start(run)
                self.started_hooks.append(hook)
                run.bus.add_hook(hook)
            if on_started is not None:
                await on_started()
            async with anyio.create_task_group() as outer:
                lossy_drained = anyio.Event()

                async def drain_lossy() -> None:
                    await run.bus.drain_lossy(run.cancel_now)
                    lossy_drained.set()

                outer.start_soon(drain_lossy)
                for companion in companions:
                    outer.start_soon(companion)
                stages_scope = anyio.CancelScope()
                outer.start_soon(self._cancel_stages_when_told, stages_scope, drain_timeout)
                try:
                    with stages_scope:
                        async with anyio.create_task_group() as tg:
                            for ctx in self.contexts:
                                tg.start_soon(run_stage, ctx.stage, ctx)
                            for partner in partners:
                                tg.start_soon(partner)
                finally:
                    run.bus.close()
                await lossy_drained.wait()
                if after_stages is not None:
                    await after_stages()
                outer.cancel_scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller, after the closes
            error = first_failure(exc)
        finally:
            run.finalizing = True
            run.error = error  # a hook's close may depend on it (no checkpoint of a learner stopped by NaNs)
            with anyio.CancelScope(shield=True):
                close_errors = await self._close()
        return error if error is not None else (close_errors[0] if close_errors else None)

    async def _cancel_stages_when_told(self, stages_scope: anyio.CancelScope, drain_timeout: float | None) -> None:
        """Cancel the stages at a second signal (or a cancel from the main process), or ``drain_timeout`` seconds
        after a stop was requested."""
        run = self.run
        async with anyio.create_task_group() as tg:
            async def cancel_when(wait: Task) -> None:
                await wait()
                stages_scope.cancel()
                tg.cancel_scope.cancel()

            async def drained_too_long() -> None:
                await run.stop_event.wait()
                await anyio.sleep(drain_timeout if drain_timeout is not None else float("inf"))

            tg.start_soon(cancel_when, drained_too_long)
            tg.start_soon(cancel_when, run.cancel_now.wait)

    async def _close(self) -> list[BaseException]:
        errors: list[BaseException] = []
        for ctx in self.contexts:
            try:
                await bounded_close(self.run, STAGE_CLOSE_S, partial(ctx.stage.close, ctx), f"stage {ctx.name}")
            except Exception as exc:  # keep closing the others
                log.error("stage close failed", stage=ctx.name, error=repr(exc))
                errors.append(StageFailed(ctx.name, exc))
        for hook in reversed(self.started_hooks):
            try:
                await bounded_close(self.run, HOOK_CLOSE_S, partial(hook.close, self.run), f"hook {hook.name}")
            except Exception as exc:
                log.error("hook close failed", hook=hook.name, error=repr(exc), traceback=traceback.format_exc())
                errors.append(StageFailed(f"hook {hook.name}", exc))
        return errors

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Per-stream counters and per-stage busy fractions of this process (a replica's streams carry ``[i]``)."""
        return {
            "streams": {name + self._suffix: s.as_dict() for name, s in self.wiring.statistics().items()},
            "busy": {ctx.name: round(ctx.busy_fraction(), 4) for ctx in self.contexts},
        }
