"""Replay stages: a writer that stores chunks and a sampler that feeds batches to the learner.

::

    rb = ReplayBuffer(ZarrStorage(100_000), batch_size=128,
                      limiter=RateLimiter(samples_per_insert=16, min_fill=1_000, batch_size=128))
    pipeline.add(WriterStage("writer", rb), SamplerStage("sampler", rb))
    pipeline.connect("env.chunks", "writer.chunks")
    pipeline.connect("sampler.batches", "learner.batches", capacity=4)   # capacity = prefetch depth

The two stages share the buffer (``shares()`` returns it: ``Pipeline.validate`` refuses them in two processes,
and ``describe`` draws ``writer ==[ReplayBuffer]== sampler``) and meet only through its rate limiter:
the writer awaits permission to insert a chunk (counting the rows ``extend`` keeps: the ``valid`` ones), the
sampler awaits permission to sample. Before its first insert the writer checks that the storage can serve the
limiter (``RateLimiter.check_capacity``). When the writer's input ends, the sampler drains what the limiter still
allows and ends too, which ends the learner.

A zarr store is flushed in a worker thread, so disk I/O never blocks the event loop: whole blocks as they fill,
and pending rows once the oldest of them waited ``ZarrStorage.commit_every_s`` (default 0.5 s; a background task
commits them while the writer waits for chunks or for the limiter). So ``kill -9`` loses at most the rows of the
last second or the last chunk. The store is flushed and committed in ``close`` on every exit path. A checkpoint
enters :meth:`WriterStage.held_for_checkpoint`: every pending row is committed first and no row is inserted until
the checkpoint has read the states, so the rows a checkpoint counts are rows the store holds. The writer speaks to
any :class:`~streamrl.replay.storage.Storage`: a RAM storage's durability members are no-ops.

Device replay: a learner that runs its update from a CUDA graph wants rows already on its device. The sampler then
mirrors the buffer there (``ReplayBuffer.mirror``) and sends :class:`~streamrl.replay.device_ring.RingBatch`
objects (indices into the mirror; ``.rows()`` gathers the batch on the device) instead of TensorDicts.
``SamplerStage(..., device_replay=None)`` decides on the first batch, when the row size is known: on when the device
(``device``, else the run's) is CUDA, the rows are vector observations (no entry over 64 KiB a step: pixel rows
stay on the host) and the mirror takes at most a quarter of the free device memory. ``True`` forces it (on CPU
too), ``False`` never. The decision is published once as a ``replay_device`` event (``device``, ``mirrored``,
``reason``) and kept in ``SamplerStage.mirrored``::

    pipeline.add(SamplerStage("sampler", rb, device_replay=None))     # auto: RingBatch on CUDA when the rows fit

Rows that stay on the host (pixels, a replay too large for the device) travel to a CUDA learner ahead of their
update: the sampler pins each batch and copies it on a side stream, and the device's default stream waits for that
copy (a wait on the device, not on the host), so the copy of batch k + 1 overlaps the learner's update k (the
``batches`` stream's capacity is the prefetch depth).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import torch

from streamrl.execution.context import RunContext, off_loop
from streamrl.replay.buffer import ReplayBuffer
from streamrl.replay.device_ring import DeviceRing
from streamrl.replay.storage import Storage
from streamrl.stages.base import Stage, StageContext


class WriterStage(Stage):
    """Stores every chunk it receives into ``buffer``; publishes ``stored`` events."""

    inputs = ("chunks",)

    def __init__(self, name: str, buffer: ReplayBuffer) -> None:
        super().__init__(name)
        self.buffer = buffer
        self.rows = 0
        self._run: RunContext | None = None  # how blocking work runs (inline in a deterministic run)
        self._lock = anyio.Lock()  # extend + flush + count, a timed commit, a checkpoint: one at a time

    async def run(self, ctx: StageContext) -> None:
        buffer = self.buffer
        self._run = ctx.run
        buffer.attach(ctx.run.run_dir)
        limiter = buffer.limiter
        storage = buffer.storage
        try:
            limiter.check_capacity(storage.capacity)
            async with anyio.create_task_group() as tasks:
                if storage.durable and not ctx.run.deterministic:  # a timer would change a deterministic schedule
                    tasks.start_soon(self._commit_on_time, storage)
                async for chunk in ctx.input("chunks"):
                    ctx.extra_wait_s += await limiter.wait_insert(buffer.rows_for(chunk))
                    async with self._lock:
                        if storage.total_written == 0:
                            # the first extend allocates the storage (the RAM ring; a store's files, importing
                            # zarr): off the loop
                            n = len(await off_loop(ctx.run, buffer.extend, chunk))
                        else:
                            n = len(buffer.extend(chunk))
                        if storage.flush_due():
                            await _flush(storage, partial=storage.commit_due(), run=ctx.run)
                        limiter.inserted(n)
                        self.rows += n
                    if ctx.wants("stored"):
                        await ctx.publish("stored", rows=self.rows, size=len(buffer))
                tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # a task failed: raise its error, not the group
            cancelled = anyio.get_cancelled_exc_class()
            error = next((e for e in group.exceptions if not isinstance(e, cancelled)), group.exceptions[0])
            raise error from error.__cause__  # its own cause (the OSError of a full disk), not the group
        finally:
            limiter.close_inserts()

    async def _commit_on_time(self, storage: Storage) -> None:
        """Commit pending rows once the oldest waited ``commit_every_s``, also while no chunk comes."""
        while True:
            await anyio.sleep(storage.seconds_to_commit())
            async with self._lock:
                if storage.commit_due():
                    await _flush(storage, partial=True, run=self._run)

    @contextlib.asynccontextmanager
    async def held_for_checkpoint(self) -> AsyncIterator[None]:
        """Commit every pending row, then insert nothing until the checkpoint has read the states.

        Raises :class:`~streamrl.errors.StoreError` when the rows cannot be committed (disk full): a checkpoint
        that counted them would promise rows the store does not hold, so none is taken.
        """
        async with self._lock:
            storage = self.buffer.storage
            if storage.pending_rows:
                await _flush(storage, partial=True, run=self._run)
            yield

    def shares(self) -> tuple[object, ...]:
        return (self.buffer,)

    async def close(self, ctx: StageContext) -> None:
        self.buffer.limiter.close_inserts()
        async with self._lock:
            await off_loop(ctx.run, self.buffer.storage.close)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = state["rows"]
        self.buffer.load_state_dict(state["buffer"])


async def _flush(storage: Storage, *, partial: bool, run: RunContext | None) -> None:
    """Flush in a worker thread (blocking file I/O never runs on the event loop; inline in a deterministic run)."""
    await off_loop(run, functools.partial(storage.flush, partial=partial))


VECTOR_STEP_BYTES = 64 * 1024  # the most bytes an entry of one step may take for auto device replay


class SamplerStage(Stage):
    """Samples batches from ``buffer`` as fast as the rate limiter and the ``batches`` stream allow.

    Batches are TensorDicts (for a CUDA learner: on its device, copied from pinned memory on a side stream;
    ``pin_memory=False`` sends host batches instead), or with device replay
    :class:`~streamrl.replay.device_ring.RingBatch` objects: see the module docstring for ``device_replay``
    (None: auto, True, False) and ``device`` (the learner's; None: the run's).
    """

    outputs = ("batches",)

    def __init__(self, name: str, buffer: ReplayBuffer, *, batch_size: int | None = None,
                 pin_memory: bool = True, device_replay: bool | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(name)
        self.buffer = buffer
        self.batch_size = batch_size or buffer.batch_size
        self.pin_memory = pin_memory
        self.device_replay = device_replay
        self.device = None if device is None else torch.device(device)
        self.mirrored: bool | None = None  # decided on the first batch
        self._copies: Any = None  # the side stream host batches are copied to a CUDA learner on

    def decide(self, device: torch.device) -> tuple[bool, str]:
        """Whether to mirror the rows on ``device``, and why (the buffer holds rows: called on the first batch)."""
        if self.device_replay is not None:
            return self.device_replay, f"device_replay={self.device_replay}"
        if device.type != "cuda":
            return False, f"the learner's device is {device}, not CUDA: batches stay TensorDicts"
        storage = self.buffer.storage
        newest = storage.get(torch.tensor([(storage.cursor - 1) % storage.capacity]))
        entries = DeviceRing.entry_bytes(newest)
        steps = 1
        if self.buffer.trajectories:  # a row is [T] steps: judge one step
            steps = next(iter(newest.values(include_nested=True, leaves_only=True))).shape[1]
        key, largest = max(entries.items(), key=lambda item: item[1])
        if largest // steps > VECTOR_STEP_BYTES:
            return False, (f"entry {key!r} takes {largest // steps} bytes a step, more than {VECTOR_STEP_BYTES} "
                           "(pixel rows stay on the host)")
        need = storage.capacity * sum(entries.values())
        free = torch.cuda.mem_get_info(device)[0]
        if need > free // 4:
            return False, (f"the mirror needs {need} bytes (capacity {storage.capacity} x {need // storage.capacity} "
                           f"bytes a row), more than a quarter of the {free} bytes free on {device}")
        return True, f"the mirror takes {need} bytes of the {free} free on {device}"

    def shares(self) -> tuple[object, ...]:
        return (self.buffer,)

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("batches")
        limiter = self.buffer.limiter
        n = self.batch_size
        device = self.device if self.device is not None else torch.device(ctx.run.device or "cpu")
        copy = self.pin_memory and device.type == "cuda"
        while True:
            waited_start = limiter.sample_wait_s
            allowed = await limiter.wait_sample(n)
            ctx.extra_wait_s += limiter.sample_wait_s - waited_start
            if not allowed:
                return  # inserts ended and the limiter allows no more batches
            if self.mirrored is None:  # the first batch: the rows' size is known now
                self.mirrored, reason = self.decide(device)
                if self.mirrored:  # on the loop: the writer's extends then find the mirror filled
                    self.buffer.mirror(device)
                await ctx.publish("replay_device", device=str(device), mirrored=self.mirrored, reason=reason)
            batch: Any
            if self.mirrored:
                batch = self.buffer.sample_ring(n)
            else:
                batch = self.buffer.sample(n)
            limiter.sampled(n)
            if copy and not self.mirrored:
                batch = self._to_device(batch, device)
            await out.send(batch)
            await anyio.lowlevel.checkpoint()  # let other stages run between batches

    def _to_device(self, batch: Any, device: torch.device) -> Any:
        """Pin ``batch`` and copy it to ``device`` on a side stream; the default stream waits for the copy there."""
        if self._copies is None:
            self._copies = torch.cuda.Stream(device)
        pinned = batch.pin_memory()
        with torch.cuda.stream(self._copies):
            moved = pinned.to(device, non_blocking=True)
        current = torch.cuda.current_stream(device)
        current.wait_stream(self._copies)  # the learner's next kernels start once the copy is done
        for tensor in moved.values(include_nested=True, leaves_only=True):
            tensor.record_stream(current)  # allocated on the side stream, used on the default one
        return moved
