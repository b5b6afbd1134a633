"""A collector for plain training loops: iterate over batches of env frames, as with TorchRL's collectors.

::

    collector = Collector(env, policy, frames_per_batch=1_000, total_frames=50_000)
    for data in collector:                  # TensorDict [num_envs, frames_per_batch / num_envs]
        ...                                 # advantages, epochs of minibatch updates on `data`
        collector.update_policy_weights_()  # the next batches act with the policy's new weights
    collector.shutdown()                    # also when the loop ends early (or use `with Collector(...) as c:`)

It is not a second implementation of collection: the env stage and the policy stage of a pipeline
(:meth:`Pipeline.add_collector <streamrl.pipeline.Pipeline.add_collector>`) run in a background thread, so a batch
has exactly the keys and semantics of the env stage's chunks: auto-reset (``valid`` marks the reset rows of envs that
reset on the next step), ``traj_id``, ``policy_version``, ``next`` with ``reward``/``done``/``terminated``/
``truncated``, ``step_count`` with a ``StepCounter`` transform, and the policy outputs named in ``record``.

The collector acts with its own copy of ``policy``: ``update_policy_weights_()`` copies the policy's current
weights into it (a new weights version, taken at the start of the next batch), so your optimizer never changes
parameters under a running forward pass. ``max_policy_lag`` is the policy stage's: ``0`` collects each batch with
the weights of the latest ``update_policy_weights_()`` (call it once per batch, as an on-policy loop does; the
next batch waits for it), ``None`` (the default) collects the next batch while your loop works on this one, with
the weights it has (at most one batch ahead).

``total_frames`` is the budget of env frames; the loop ends after the batch that reaches it. A failure of the env or
the policy in the background is raised by the loop, as the pipeline's error.
"""

from __future__ import annotations

import copy
import queue
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import anyio
from tensordict import TensorDictBase

from streamrl.errors import ConfigError
from streamrl.execution.main import run
from streamrl.pipeline import Pipeline
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.policy import weights_message

_END = object()  # the background run ended (its error, if any, is kept on the collector)


class _WeightsIn(Stage):
    """Sends the weights ``update_policy_weights_`` puts in ``inbox`` to the policy stage; ends on ``None`` (put by
    ``_BatchesOut`` when the chunks end, or by ``shutdown``)."""

    outputs = ("weights",)
    source = True

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__("weights_in")
        self.inbox = inbox

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("weights")
        while (message := await anyio.to_thread.run_sync(self.inbox.get, abandon_on_cancel=True)) is not None:
            await out.send(message)


class _BatchesOut(Stage):
    """Hands each chunk to the iterating thread through ``outbox`` (one at a time: the env stage waits)."""

    inputs = ("chunks",)

    def __init__(self, outbox: queue.Queue[Any], stop: threading.Event, inbox: queue.Queue[Any]) -> None:
        super().__init__("batches_out")
        self.outbox = outbox
        self.stop = stop
        self.inbox = inbox

    async def run(self, ctx: StageContext) -> None:
        try:
            await self._hand_over(ctx)
        finally:
            self.inbox.put(None)  # no more batches: the weights source ends too

    async def _hand_over(self, ctx: StageContext) -> None:
        async for chunk in ctx.input("chunks"):
            while not self.stop.is_set():
                try:
                    await anyio.to_thread.run_sync(self.outbox.put, chunk, True, 0.1)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set():
                return  # shut down: the env stage's next send ends it


class Collector:
    """Batches of env frames for a ``for`` loop; see the module docstring."""

    def __init__(self, env: Any, policy: Any, *, frames_per_batch: int, total_frames: int,
                 max_policy_lag: int | None = None, record: tuple[str, ...] = ("action",), seed: int = 0) -> None:
        if isinstance(total_frames, bool) or not isinstance(total_frames, int) or total_frames < 1:
            raise ConfigError(f"Collector: total_frames must be an int >= 1, got {total_frames!r}")
        self.policy = policy
        self.acting = copy.deepcopy(policy)  # what the background thread runs: your updates never race its forward
        self.version = 0
        self.frames = 0
        self.seed = seed
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._outbox: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._run_dir: tempfile.TemporaryDirectory[str] | None = None
        p = Pipeline("collector")
        group = p.add_collector("collect", env, self.acting, frames_per_chunk=frames_per_batch,
                                total_frames=total_frames, placement="in_process", weights_from=None,
                                max_policy_lag=max_policy_lag, record=record)
        p.add(_WeightsIn(self._inbox), _BatchesOut(self._outbox, self._stop, self._inbox))
        p.connect("weights_in.weights", f"{group.policy}.weights", capacity=1, overflow="drop_oldest")
        p.connect(group.chunks, "batches_out.chunks", capacity=1)
        p.validate()
        self.pipeline = p

    def update_policy_weights_(self) -> None:
        """Send the policy's current weights to the collector: the next batch acts with them."""
        self.version += 1
        self._inbox.put(weights_message(self.policy, self.version))

    def __iter__(self) -> Iterator[TensorDictBase]:
        if self._thread is None:
            self._start()
        while True:
            item = self._outbox.get()
            if item is _END:
                self._outbox.put(_END)  # a second loop over an ended collector ends at once too
                if self._error is not None:
                    raise self._error
                return
            self.frames += item.numel()
            yield item

    def _start(self) -> None:
        self._run_dir = tempfile.TemporaryDirectory(prefix="streamrl-collector-")
        run_dir = self._run_dir.name

        def background() -> None:
            try:
                run(self.pipeline, run_dir, seed=self.seed, handle_signals=False)
            except BaseException as exc:  # raised in the iterating thread
                self._error = exc
            finally:
                self._inbox.put(None)
                while True:  # the loop may hold the outbox full: make room for the end mark
                    try:
                        self._outbox.put(_END, timeout=0.1)
                        break
                    except queue.Full:
                        if self._stop.is_set():
                            self._drain()

        self._thread = threading.Thread(target=background, name="streamrl-collector", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while True:
                self._outbox.get_nowait()
        except queue.Empty:
            pass

    def shutdown(self) -> None:
        """Stop collecting and wait for the background run to end (idempotent)."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._drain()
            self._thread.join()
        if self._run_dir is not None:
            self._run_dir.cleanup()
            self._run_dir = None

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
