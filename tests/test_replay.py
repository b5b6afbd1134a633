"""Replay: RAM and zarr storages, the rate limiter, the writer/sampler stages."""

import asyncio

import anyio
import numpy as np
import pytest
import torch
import zarr
from tensordict import TensorDict

import streamrl
from streamrl import (
    ConfigError,
    Pipeline,
    RamStorage,
    RateLimiter,
    ReplayBuffer,
    SamplerStage,
    WriterStage,
    ZarrStorage,
)
from streamrl.testing import Collect, ListSource, random_chunks


def rows(start, n):
    idx = torch.arange(start, start + n)
    return TensorDict({"x": idx.float()[:, None].repeat(1, 3), "next": {"done": (idx % 7 == 0)[:, None]}},
                      batch_size=[n])


def test_ram_storage_wraps_around_and_gathers_rows():
    s = RamStorage(10)
    assert s.extend(rows(0, 6)).tolist() == [0, 1, 2, 3, 4, 5]
    assert s.extend(rows(6, 6)).tolist() == [6, 7, 8, 9, 0, 1]
    assert len(s) == 10 and s.cursor == 2
    got = s.get(torch.tensor([0, 1, 2, 9]))
    assert got["x"][:, 0].tolist() == [10.0, 11.0, 2.0, 9.0]
    assert got["next", "done"].shape == (4, 1)


def test_zarr_storage_commits_whole_blocks_and_reopens(tmp_path):
    path = tmp_path / "store.zarr"
    s = ZarrStorage(100, path=path, block_rows=16)
    s.extend(rows(0, 40))
    assert s.flush() == 32  # two whole blocks; the partial third waits
    assert zarr.open_group(str(path), mode="r").attrs["committed"]["rows"] == 32
    s.close()  # the partial block too
    reopened = ZarrStorage.open(path)
    assert len(reopened) == 40
    assert torch.equal(reopened.get(torch.arange(40))["x"], rows(0, 40)["x"])
    # plain zarr + numpy read it back
    g = zarr.open_group(str(path), mode="r")
    assert np.array_equal(g["x"][:40], rows(0, 40)["x"].numpy())
    assert g["next/done"].dtype == np.bool_
    # writing resumes after the committed rows
    reopened.extend(rows(40, 10))
    reopened.close()
    assert len(ZarrStorage.open(path)) == 50


def test_zarr_storage_wraps_and_keeps_the_newest_rows(tmp_path):
    s = ZarrStorage(32, path=tmp_path / "ring.zarr", block_rows=8)
    for start in range(0, 80, 10):
        s.extend(rows(start, 10))
        s.flush()
    s.close()
    again = ZarrStorage.open(tmp_path / "ring.zarr")
    assert len(again) == 32
    assert sorted(again.get(torch.arange(32))["x"][:, 0].tolist()) == list(range(48, 80))


def test_buffer_drops_invalid_rows():
    rb = ReplayBuffer(RamStorage(100), batch_size=4)
    chunk = random_chunks(1, num_envs=2, steps=5)[0]
    chunk["valid"] = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    assert len(rb.extend(chunk)) == 8
    assert "valid" not in rb.sample().keys()


async def test_rate_limiter_keeps_samples_per_insert_within_the_band():
    limiter = RateLimiter(samples_per_insert=2.0, min_fill=10, tolerance=8, batch_size=4)
    assert not limiter.can_sample(4)  # min fill first
    limiter.inserted(10)
    assert limiter.can_sample(4)
    while limiter.can_sample(4):
        limiter.sampled(4)
    # diff = 10*2 - samples must stay >= 2*10 - 8
    assert limiter.inserts * 2 - limiter.samples >= 20 - 8
    waiting = asyncio.ensure_future(limiter.wait_sample(4))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the learner waits for collection...
    limiter.inserted(4)
    assert await asyncio.wait_for(waiting, 1) is True  # ...and resumes when rows arrive


async def test_rate_limiter_blocks_inserts_when_collection_runs_ahead():
    limiter = RateLimiter(samples_per_insert=1.0, min_fill=4, tolerance=4, batch_size=4)
    limiter.inserted(8)  # diff 8 > 4 + 4? no: 8 <= 8
    assert limiter.can_insert()
    limiter.inserted(1)
    assert not limiter.can_insert()
    waiting = asyncio.ensure_future(limiter.wait_insert())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    limiter.sampled(4)
    await asyncio.wait_for(waiting, 1)


async def test_rate_limiter_waits_time_out_with_an_explanation():
    limiter = RateLimiter(samples_per_insert=1.0, min_fill=4, batch_size=4, timeout=0.05)
    with pytest.raises(TimeoutError, match="waited 0.05s to sample"):
        await limiter.wait_sample(4)


async def test_closed_inserts_release_a_waiting_sampler():
    limiter = RateLimiter(samples_per_insert=1.0, min_fill=4, batch_size=4)
    waiting = asyncio.ensure_future(limiter.wait_sample(4))
    await asyncio.sleep(0)
    limiter.close_inserts()
    assert await asyncio.wait_for(waiting, 1) is False


def test_deadlocking_band_is_rejected():
    with pytest.raises(ConfigError, match="tolerance=1.0 sampled rows is too narrow for batch_size=8"):
        RateLimiter(samples_per_insert=1.0, tolerance=1, batch_size=8)
    with pytest.raises(ConfigError, match="min_fill must be >= 1"):
        RateLimiter(min_fill=0)


def test_writer_and_sampler_stages_pace_each_other(tmp_path):
    """Once collection ends the learner catches up: samples / inserts ends at the requested ratio."""
    rb = ReplayBuffer(ZarrStorage(1000, block_rows=64), batch_size=8,
                      limiter=RateLimiter(samples_per_insert=4.0, min_fill=40, tolerance=64, batch_size=8))
    chunks = random_chunks(30, num_envs=2, steps=10)
    learner = Collect("learner", keep=False)
    p = Pipeline("replay")
    p.add(ListSource("src", chunks), WriterStage("writer", rb), SamplerStage("sampler", rb), learner)
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.items", capacity=2)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    inserted = 30 * 20
    sampled = learner.count * 8
    assert 4.0 * inserted - 8 < sampled <= 4.0 * inserted
    assert ZarrStorage.open(tmp_path / "replay.zarr").committed_rows == inserted
    assert result.summary["stages"]["busy_fraction"]["sampler"] < 1.0


def test_zarr_flushes_run_off_the_event_loop(tmp_path):
    """A writer flushing large blocks never stalls the loop: a ticker stage keeps ticking meanwhile."""
    import time

    class Ticker(streamrl.Stage):
        def __init__(self, name):
            super().__init__(name)
            self.gaps = []

        async def run(self, ctx):
            last = time.perf_counter()
            while not ctx.stopping:
                await anyio.sleep(0.002)
                now = time.perf_counter()
                self.gaps.append(now - last)
                last = now

    big = [TensorDict({"x": torch.randn(2, 64, 16_384)}, batch_size=[2, 64]) for _ in range(12)]  # 8 MB each
    storage = ZarrStorage(2048, block_rows=256)
    rb = ReplayBuffer(storage, batch_size=8)
    ticker = Ticker("ticker")
    p = Pipeline("flush").add(ListSource("src", big), WriterStage("writer", rb), ticker)
    p.connect("src.items", "writer.chunks")

    class StopWhenDone(streamrl.Hook):
        events = ("stored",)

        async def start(self, run):
            self.run = run

        def on_event(self, event):
            if event.data["rows"] >= 12 * 128:
                self.run.request_stop("done")

    p.add_hook(StopWhenDone())
    start = time.perf_counter()
    streamrl.run(p, tmp_path, handle_signals=False)
    elapsed = time.perf_counter() - start
    assert storage.committed_rows == 12 * 128
    assert len(ticker.gaps) > 10
    # the flushes took most of the run; no single tick waited for one of them
    assert max(ticker.gaps) < max(0.1, elapsed / 4)


async def test_a_batch_larger_than_the_band_is_rejected_instead_of_deadlocking():
    limiter = RateLimiter(samples_per_insert=1.0)  # sized for batches of 1 row
    limiter.inserted(200)
    with pytest.raises(ConfigError, match="batches of 128 rows need tolerance >= 64"):
        await limiter.wait_sample(128)


@pytest.mark.parametrize("zarr_store", [False, True])
def test_trajectory_rows_store_each_envs_steps_whole(tmp_path, zarr_store):
    chunks = random_chunks(3, num_envs=4, steps=16)
    storage = ZarrStorage(8, path=tmp_path / "traj.zarr", block_rows=4) if zarr_store else RamStorage(8)
    rb = ReplayBuffer(storage, batch_size=5, trajectories=True)
    for chunk in chunks:
        rb.extend(chunk)
    assert len(rb) == 8  # rows are trajectories: 3 chunks x 4 envs, the ring keeps the newest 8
    batch = rb.sample()
    assert batch.batch_size == (5, 16)
    kept = torch.cat([c for c in chunks])[4:]  # the last two chunks' env rows, in write order
    for b in range(5):
        slot = int(batch["index"][b, 0])
        assert (batch["index"][b] == slot).all()
        row = kept[(slot - 12) % 8]
        assert torch.equal(batch["observation"][b], row["observation"])
        assert torch.equal(batch["next", "reward"][b], row["next", "reward"])
    with pytest.raises(ValueError, match="chunks"):
        rb.extend(chunks[0].reshape(-1))
