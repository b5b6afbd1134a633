"""Replay stages: a writer that stores chunks and a sampler that feeds batches to the learner.

::

    rb = ReplayBuffer(ZarrStorage(100_000), batch_size=128,
                      limiter=RateLimiter(samples_per_insert=16, min_fill=1_000, batch_size=128))
    pipeline.add(WriterStage("writer", rb), SamplerStage("sampler", rb))
    pipeline.connect("env.chunks", "writer.chunks")
    pipeline.connect("sampler.batches", "learner.batches", capacity=4)   # capacity = prefetch depth

The two stages share the buffer (they must run in the same process) and meet only through its rate limiter:
the writer awaits permission to insert a chunk (counting the rows ``extend`` keeps: the ``valid`` ones), the
sampler awaits permission to sample. Before its first insert the writer checks that the storage can serve the
limiter (``RateLimiter.check_capacity``). A zarr store is flushed in a worker thread, block by block, so disk I/O
never blocks the event loop; the store is flushed and committed in ``close`` on every exit path. When the
writer's input ends, the sampler drains what the limiter still allows and ends too, which ends the learner.
"""

from __future__ import annotations

from typing import Any

import anyio
import torch

from streamrl.replay.buffer import ReplayBuffer
from streamrl.replay.zarr_store import ZarrStorage
from streamrl.stages.base import Stage, StageContext


class WriterStage(Stage):
    """Stores every chunk it receives into ``buffer``; publishes ``stored`` events."""

    inputs = ("chunks",)

    def __init__(self, name: str, buffer: ReplayBuffer) -> None:
        super().__init__(name)
        self.buffer = buffer
        self.rows = 0

    async def run(self, ctx: StageContext) -> None:
        buffer = self.buffer
        buffer.attach(ctx.run.run_dir)
        limiter = buffer.limiter
        storage = buffer.storage
        try:
            limiter.check_capacity(storage.capacity)
            async for chunk in ctx.input("chunks"):
                ctx.extra_wait_s += await limiter.wait_insert(buffer.rows_for(chunk))
                n = len(buffer.extend(chunk))
                self.rows += n
                if isinstance(storage, ZarrStorage) and storage.pending_rows >= storage.block_rows:
                    await anyio.to_thread.run_sync(storage.flush)
                limiter.inserted(n)
                if ctx.wants("stored"):
                    await ctx.publish("stored", rows=self.rows, size=len(buffer))
        finally:
            limiter.close_inserts()

    async def close(self, ctx: StageContext) -> None:
        self.buffer.limiter.close_inserts()
        await anyio.to_thread.run_sync(self.buffer.storage.close)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = state["rows"]
        self.buffer.load_state_dict(state["buffer"])


class SamplerStage(Stage):
    """Samples batches from ``buffer`` as fast as the rate limiter and the ``batches`` stream allow."""

    outputs = ("batches",)

    def __init__(self, name: str, buffer: ReplayBuffer, *, batch_size: int | None = None,
                 pin_memory: bool = False) -> None:
        super().__init__(name)
        self.buffer = buffer
        self.batch_size = batch_size or buffer.batch_size
        self.pin_memory = pin_memory

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("batches")
        limiter = self.buffer.limiter
        n = self.batch_size
        pin = self.pin_memory and torch.cuda.is_available()
        while True:
            waited_start = limiter.sample_wait_s
            allowed = await limiter.wait_sample(n)
            ctx.extra_wait_s += limiter.sample_wait_s - waited_start
            if not allowed:
                return  # inserts ended and the limiter allows no more batches
            batch = self.buffer.sample(n)
            limiter.sampled(n)
            if pin:
                batch = batch.pin_memory()
            await out.send(batch)
            await anyio.lowlevel.checkpoint()  # let other stages run between batches
