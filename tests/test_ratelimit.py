"""The rate limiter: the samples-per-insert band, min_fill, timeouts, deadlock checks, queue mode, resuming.

Most tests run a fast writer coroutine against a fast sampler coroutine (``pace``), each yielding to the other
a random number of times, under a timeout that turns a deadlock into a failure.
"""

import asyncio
import random
from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict

from streamrl import ConfigError, Pipeline, RamStorage, RateLimiter, ReplayBuffer, SamplerStage, WriterStage
from streamrl.errors import StageFailed
from streamrl.execution.main import run_async
from streamrl.replay.samplers import FifoSampler
from streamrl.testing import Collect, ListSource, random_chunks


async def pace(
    limiter: RateLimiter,
    *,
    rows: int,
    chunk_rows: range,
    batch: int,
    seed: int = 0,
    after_insert: Callable[[int], None] = lambda n: None,
    after_sample: Callable[[int], None] = lambda n: None,
) -> dict[str, int]:
    """Insert ``rows`` rows in random chunks while sampling batches until the limiter says no more.

    ``after_insert(n)`` / ``after_sample(n)`` run right after each counted insert / sample, with no await between.
    Returns the number of batches and how many times each side had to wait.
    """
    rng = random.Random(seed)
    counts = {"batches": 0, "insert_waits": 0, "sample_waits": 0}

    async def writer() -> None:
        left = rows
        while left:
            n = min(left, rng.choice(chunk_rows))
            counts["insert_waits"] += not limiter.can_insert(n)
            await limiter.wait_insert(n)
            limiter.inserted(n)
            after_insert(n)
            left -= n
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
        limiter.close_inserts()

    async def sampler() -> None:
        while True:
            counts["sample_waits"] += not limiter.can_sample(batch)
            if not await limiter.wait_sample(batch):
                return
            limiter.sampled(batch)
            after_sample(batch)
            counts["batches"] += 1
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)

    async with asyncio.timeout(30):  # a deadlock fails here instead of hanging
        await asyncio.gather(writer(), sampler())
    return counts


# (samples_per_insert, min_fill, tolerance, batch, chunk rows): bands one batch wide (the edge of the rule) and wider;
# 0.1 exercises float rounding at the edge, 100.0 a ratio for which Reverb's rule would ask for tolerance >= 100.
RATIO_CASES = [
    (0.1, 10, 1.5, 3, range(1, 31)),
    (0.25, 16, 2.0, 4, range(1, 13)),
    (1.0, 32, 24.0, 8, range(1, 21)),
    (16.0, 20, 8.0, 16, range(1, 11)),
    (100.0, 5, 0.5, 1, range(1, 6)),
]


@pytest.mark.parametrize(("spi", "min_fill", "tolerance", "batch", "chunk_rows"), RATIO_CASES)
async def test_samples_per_insert_stays_in_the_band_through_a_long_random_run(spi, min_fill, tolerance, batch,
                                                                             chunk_rows):
    limiter = RateLimiter(samples_per_insert=spi, min_fill=min_fill, tolerance=tolerance, batch_size=batch)
    top, bottom = spi * min_fill + tolerance, spi * min_fill - tolerance
    eps = 1e-9

    def after_insert(n: int) -> None:
        # a chunk is admitted from inside the band, so diff passes the top by at most that chunk
        assert limiter.diff - n * spi <= top + eps
        if limiter.inserts >= min_fill:
            assert limiter.diff >= bottom - eps

    def after_sample(n: int) -> None:
        assert limiter.inserts >= min_fill
        assert limiter.diff <= top + max(chunk_rows) * spi + eps
        if not limiter.inserts_closed:
            assert limiter.diff >= bottom - eps  # the learner never runs ahead of the band

    rows = 200 + int(4_000 / max(spi, 1))
    counts = await pace(limiter, rows=rows, chunk_rows=chunk_rows, batch=batch, seed=int(spi * 10),
                        after_insert=after_insert, after_sample=after_sample)
    assert counts["insert_waits"] > 10 and counts["sample_waits"] > 10  # both edges of the band were reached
    # once inserts closed, the sampler drained down to the ratio, to within one batch
    assert limiter.inserts == rows
    assert 0 <= limiter.diff < batch and counts["batches"] * batch == limiter.samples


@pytest.mark.parametrize(("spi", "min_fill", "tolerance", "batch", "chunk_rows"),
                         [case for case in RATIO_CASES if 2 * case[2] == case[3]])
async def test_a_band_narrower_than_one_batch_is_rejected_and_one_batch_wide_never_stalls(spi, min_fill, tolerance,
                                                                                          batch, chunk_rows):
    narrow = batch / 2 - 0.25
    with pytest.raises(ConfigError, match=rf"tolerance={narrow} sampled rows is too narrow for batch_size={batch}"
                                          rf".*Pass tolerance >= {batch / 2}"):
        RateLimiter(samples_per_insert=spi, min_fill=min_fill, tolerance=narrow, batch_size=batch)
    # exactly one batch wide: whatever the chunks, one side can always move
    for seed in range(5):
        limiter = RateLimiter(samples_per_insert=spi, min_fill=min_fill, tolerance=tolerance, batch_size=batch)
        rows = int(1_000 / max(spi, 1))
        await pace(limiter, rows=rows, chunk_rows=chunk_rows, batch=batch, seed=seed)
        assert limiter.inserts == rows and 0 <= limiter.diff < batch


@pytest.mark.parametrize("spi", [None, 2.0])
async def test_sampling_waits_for_min_fill(spi):
    limiter = RateLimiter(samples_per_insert=spi, min_fill=10, tolerance=8, batch_size=2)
    waiting = asyncio.ensure_future(limiter.wait_sample(2))
    for _ in range(5):
        limiter.inserted(3)
        for _ in range(3):
            await asyncio.sleep(0)
        assert waiting.done() is (limiter.inserts >= 10), limiter.inserts
    assert waiting.result() is True


async def test_waits_are_awaits_that_time_out_with_the_state_in_the_message():
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    limiter = RateLimiter(samples_per_insert=1.0, min_fill=4, tolerance=2, batch_size=4, timeout=0.05)
    limiter.inserted(7)  # diff 7 is above the top, 4 + 2
    with pytest.raises(TimeoutError, match=r"waited 0.05s to insert \(inserted=7 rows, sampled=0 rows, "
                                           r"samples_per_insert=1.0, min_fill=4\).*raise the timeout"):
        await limiter.wait_insert(1)
    queue = RateLimiter.queue(8, batch_size=4, timeout=0.05)
    queue.inserted(3)
    with pytest.raises(TimeoutError, match=r"waited 0.05s to sample \(inserted=3 rows, sampled=0 rows, "
                                           r"queue capacity=8\)"):
        await queue.wait_sample(4)
    ticking.cancel()
    assert ticks >= 10  # the event loop kept running while both waited


async def test_min_fill_beyond_the_storage_is_rejected_and_min_fill_equal_to_it_runs(tmp_path):
    limiter = RateLimiter(samples_per_insert=1.0, min_fill=60, batch_size=4)
    with pytest.raises(ConfigError, match="min_fill=60 rows is more than the storage holds \\(capacity=50 rows\\)"
                                          ".*lower min_fill to at most 50 or raise the storage capacity"):
        limiter.check_capacity(50)

    def pipeline(min_fill: int) -> tuple[Pipeline, Collect]:
        rb = ReplayBuffer(RamStorage(50), batch_size=4,
                          limiter=RateLimiter(samples_per_insert=1.0, min_fill=min_fill, batch_size=4))
        learner = Collect("learner", keep=False)
        p = Pipeline("fill").add(ListSource("src", random_chunks(20, num_envs=2, steps=5)), WriterStage("writer", rb),
                                 SamplerStage("sampler", rb), learner)
        p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.items")
        return p, learner

    p, _ = pipeline(min_fill=60)
    with pytest.raises(StageFailed) as failed:  # the writer checks before its first insert
        await asyncio.wait_for(run_async(p, tmp_path / "too_much", handle_signals=False), 30)
    assert failed.value.stage == "writer" and isinstance(failed.value.__cause__, ConfigError)
    p, learner = pipeline(min_fill=50)
    await asyncio.wait_for(run_async(p, tmp_path / "fits", handle_signals=False), 30)
    assert learner.count == 200 // 4  # 200 rows inserted, one sample per insert


def ring_model(capacity: int, limiter: RateLimiter) -> tuple[list[int], Callable[[int], None], Callable[[int], None]]:
    """A list ring written like a storage and read like ``FifoSampler``; returns (rows read, insert, sample)."""
    ring: list[int] = [-1] * capacity
    read: list[int] = []

    def insert(n: int) -> None:
        for row in range(limiter.inserts - n, limiter.inserts):
            ring[row % capacity] = row

    def sample(n: int) -> None:
        start = limiter.samples - n
        read.extend(ring[(start + i) % capacity] for i in range(n))

    return read, insert, sample


@pytest.mark.parametrize("seed", range(4))
async def test_queue_serves_every_row_exactly_once_in_write_order(seed):
    capacity, batch = 12, 4  # chunks of up to 9 rows: the tightest capacity that cannot stall
    limiter = RateLimiter.queue(capacity, batch_size=batch)
    read, insert, sample = ring_model(capacity, limiter)

    def after_insert(n: int) -> None:
        insert(n)
        assert limiter.unsampled <= capacity

    await pace(limiter, rows=1_001, chunk_rows=range(1, 10), batch=batch, seed=seed,
               after_insert=after_insert, after_sample=sample)
    # an overwritten row would show up as a later row; the last partial batch (1 row) is not served
    assert read == list(range(1_000))
    assert limiter.unsampled == 1 and await limiter.wait_sample(batch) is False


async def test_queue_writer_blocks_rather_than_overwrite_unsampled_rows():
    limiter = RateLimiter.queue(8, batch_size=4)
    for n in (4, 3):
        await limiter.wait_insert(n)
        limiter.inserted(n)
    waiting = asyncio.ensure_future(limiter.wait_insert(2))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # 7 unsampled rows in a queue of 8: 2 more would overwrite the oldest
    assert await limiter.wait_sample(4)
    limiter.sampled(4)
    await asyncio.wait_for(waiting, 1)  # 3 unsampled: now 2 more fit


async def test_queue_rejects_what_would_stall_and_runs_at_the_edge():
    with pytest.raises(ConfigError, match="a queue needs 1 <= batch_size <= capacity, got batch_size=16 and "
                                          "capacity=8"):
        RateLimiter.queue(8, batch_size=16)
    limiter = RateLimiter.queue(8, batch_size=4)
    # 6 rows in, 4 out: with 3 unsampled rows, the insert would overwrite and the batch is not full
    with pytest.raises(ConfigError, match=r"capacity=8 rows cannot take inserts of 6 rows with batches of 4.*"
                                          r"capacity must be >= rows per insert \+ batch_size - 1 = 9"):
        await limiter.wait_insert(6)
    with pytest.raises(ConfigError, match="inserts of 9 rows"):  # a chunk larger than the queue
        await limiter.wait_insert(9)
    with pytest.raises(ValueError, match=r"call wait_insert\(n\)"):
        await limiter.wait_insert()
    with pytest.raises(ConfigError, match="sized for batches of 4 rows, got a batch of 5; pass batch_size=5"):
        await limiter.wait_sample(5)
    with pytest.raises(ConfigError, match=r"holds up to 8 unsampled rows but the storage only 6.*"
                                          r"RateLimiter.queue\(6, ...\)"):
        limiter.check_capacity(6)
    # chunks of 5 rows with batches of 4 in 8 rows: capacity == 5 + 4 - 1, never stalls
    await pace(limiter, rows=1_000, chunk_rows=range(5, 6), batch=4)
    assert limiter.samples == 1_000


async def test_state_dict_resumes_the_limiter():
    ratio = RateLimiter(samples_per_insert=2.0, min_fill=10, tolerance=4, batch_size=4)
    ratio.inserted(15)
    ratio.sampled(8)
    resumed = RateLimiter(samples_per_insert=2.0, min_fill=10, tolerance=4, batch_size=4)
    resumed.load_state_dict(ratio.state_dict())
    assert resumed.state_dict() == {"inserts": 15, "samples": 8}
    assert (resumed.diff, resumed.can_insert(), resumed.can_sample(4), resumed.can_sample(8)) == (22.0, True, True,
                                                                                                  False)

    queue = RateLimiter.queue(8, batch_size=4)
    queue.inserted(7)
    queue.sampled(4)
    resumed = RateLimiter.queue(8, batch_size=4)
    resumed.load_state_dict(queue.state_dict())
    assert resumed.can_insert(5) and not resumed.can_insert(6)  # 3 rows still wait to be sampled
    resumed.close_inserts()
    assert await resumed.wait_sample(3) is True and await resumed.wait_sample(4) is False
    with pytest.raises(ConfigError, match="cannot resume a queue of capacity=8 from inserts=15 and samples=30"):
        RateLimiter.queue(8, batch_size=4).load_state_dict({"inserts": 15, "samples": 30})  # a ratio's state


async def test_an_unpaced_sampler_ends_with_the_inserts():
    limiter = RateLimiter(min_fill=4)
    limiter.inserted(10)
    assert await limiter.wait_sample(4) is True
    limiter.close_inserts()
    assert await limiter.wait_sample(4) is False


async def test_queue_pipeline_serves_each_valid_row_once_in_order(tmp_path):
    """Writer, FifoSampler and a queue end to end; the writer counts only the rows ``extend`` keeps."""
    gen = torch.Generator().manual_seed(0)
    chunks, next_row = [], 0
    for _ in range(30):
        valid = torch.ones(2 * 6, dtype=torch.bool)
        valid[torch.randperm(12, generator=gen)[: 3 + int(torch.randint(4, (1,), generator=gen))]] = False
        x = torch.full((12,), -1.0)
        x[valid] = torch.arange(next_row, next_row + int(valid.sum()), dtype=torch.float32)
        next_row += int(valid.sum())
        chunks.append(TensorDict({"x": x.view(2, 6), "valid": valid.view(2, 6)}, batch_size=[2, 6]))
    # at most 9 valid rows per chunk: capacity 12 holds a chunk plus a batch less a row; 12 raw rows would not
    rb = ReplayBuffer(RamStorage(12), sampler=FifoSampler(), batch_size=4, limiter=RateLimiter.queue(12, 4))
    learner = Collect("learner")
    p = Pipeline("queue").add(ListSource("src", chunks), WriterStage("writer", rb), SamplerStage("sampler", rb),
                              learner)
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.items")
    await asyncio.wait_for(run_async(p, tmp_path, handle_signals=False), 30)
    served = torch.cat([batch["x"] for batch in learner.items]).long().tolist()
    assert served == list(range(next_row // 4 * 4))  # each row once, in order; the partial batch is not served


async def test_a_trajectory_queue_counts_one_row_per_env(tmp_path):
    """Trajectory rows: a chunk [4 envs, 16 steps] stores 4 rows, and the limiter must count 4, not 64."""
    chunks = [TensorDict({"x": torch.full((4, 16), float(i))}, batch_size=[4, 16]) for i in range(6)]
    rb = ReplayBuffer(RamStorage(8), sampler=FifoSampler(), batch_size=4, limiter=RateLimiter.queue(8, 4),
                      trajectories=True)
    assert rb.rows_for(chunks[0]) == 4
    learner = Collect("learner")
    p = Pipeline("queue").add(ListSource("src", chunks), WriterStage("writer", rb), SamplerStage("sampler", rb),
                              learner)
    p.connect("src.items", "writer.chunks").connect("sampler.batches", "learner.items")
    await asyncio.wait_for(run_async(p, tmp_path, handle_signals=False), 30)
    served = [int(batch["x"][0, 0]) for batch in learner.items]
    assert served == list(range(6)) and all(batch.batch_size == (4, 16) for batch in learner.items)
