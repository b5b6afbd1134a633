"""The rate limiter: how many rows may be sampled per row inserted (Reverb's samples-per-insert idea), or a queue.

**Ratio mode.** Counting in rows, ``diff = inserted * samples_per_insert - sampled``. The limiter keeps ``diff``
in a band of ``± tolerance`` around ``samples_per_insert * min_fill``:

* sampling waits until ``min_fill`` rows were inserted, and while a batch would take ``diff`` below the band —
  the learner is ahead of collection;
* inserting waits while ``diff`` is above the band — collection is ahead of the learner. A chunk is admitted
  whole while ``diff`` is at or below the top, so ``diff`` may pass the top by one chunk
  (``rows * samples_per_insert``).

::

    limiter = RateLimiter(samples_per_insert=8.0, min_fill=1_000, tolerance=2_048, batch_size=256)
    await limiter.wait_insert(rows)      # writer stage, before storing a chunk of `rows` rows
    limiter.inserted(rows)
    if await limiter.wait_sample(256):   # sampler stage, before each batch; False: there will be no more
        limiter.sampled(256)

**Queue mode.** Every inserted row is sampled exactly once (in write order with ``FifoSampler``)::

    limiter = RateLimiter.queue(capacity=10_000, batch_size=256)

Sampling waits until ``batch_size`` unsampled rows exist; inserting ``rows`` more waits while they would
overwrite rows not yet sampled (``unsampled + rows > capacity``), so ``wait_insert`` needs ``rows`` here.

Waits are awaits (the event loop keeps running) with an optional ``timeout`` that raises ``TimeoutError``.

When the writer is done (``close_inserts``), the sampler drains what is left and then ``wait_sample`` returns
``False``, which ends the sampler stage and so the learner: in ratio mode once exactly ``samples_per_insert`` rows
were sampled per row inserted; in queue mode once fewer than a batch of unsampled rows remain — a last partial
batch is never served; with no ratio at all, at once.

Configurations that would stall both sides forever raise ``ConfigError`` with the fix: a band narrower than a
batch (at construction), a ``min_fill`` beyond the storage (``check_capacity``, which the writer stage calls), a
queue whose chunks and batches do not fit its capacity (at the first insert that does not fit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from streamrl.errors import ConfigError


class RateLimiter:
    """Samples-per-insert with a tolerance band and a minimum fill, or a queue; awaitable waits with timeouts."""

    def __init__(
        self,
        *,
        samples_per_insert: float | None = None,
        min_fill: int = 1,
        tolerance: float | None = None,
        batch_size: int = 1,
        timeout: float | None = None,
    ) -> None:
        if min_fill < 1:
            raise ConfigError(f"min_fill must be >= 1 row, got {min_fill}")
        if samples_per_insert is not None and samples_per_insert <= 0:
            raise ConfigError(f"samples_per_insert must be > 0 (or None for no limit), got {samples_per_insert}")
        self.samples_per_insert = samples_per_insert
        self.min_fill = min_fill
        self.batch_size = batch_size
        self.tolerance = float(tolerance if tolerance is not None else 2 * max(batch_size, 1))
        self.queue_capacity: int | None = None
        self.timeout = timeout
        self.inserts = 0
        self.samples = 0
        self.inserts_closed = False
        self.sample_wait_s = 0.0
        self._waiters: list[asyncio.Future[None]] = []
        self._check_batch(batch_size)

    @classmethod
    def queue(cls, capacity: int, batch_size: int, *, timeout: float | None = None) -> RateLimiter:
        """A limiter that serves every inserted row exactly once; see the module docstring.

        ``capacity`` is how many unsampled rows may wait (at most the storage's capacity); it must also hold one
        insert chunk plus one batch less a row, which the first insert checks::

            rb = ReplayBuffer(RamStorage(4_096), sampler=FifoSampler(), batch_size=256,
                              limiter=RateLimiter.queue(4_096, batch_size=256))
        """
        if not 1 <= batch_size <= capacity:
            raise ConfigError(f"a queue needs 1 <= batch_size <= capacity, got {batch_size=} and {capacity=}; "
                              "a batch waits for batch_size unsampled rows, which the queue must be able to hold")
        limiter = cls(batch_size=batch_size, timeout=timeout)
        limiter.queue_capacity = capacity
        return limiter

    @property
    def diff(self) -> float:
        assert self.samples_per_insert is not None
        return self.inserts * self.samples_per_insert - self.samples

    @property
    def unsampled(self) -> int:
        """Rows inserted and not yet sampled (what a queue holds)."""
        return self.inserts - self.samples

    @property
    def _top(self) -> float:
        assert self.samples_per_insert is not None
        return self.samples_per_insert * self.min_fill + self.tolerance

    def can_insert(self, n: int | None = None) -> bool:
        """Whether a chunk of ``n`` rows may be inserted now (``n`` is needed in queue mode only)."""
        if self.queue_capacity is not None:
            return self.unsampled + self._queue_rows(n) <= self.queue_capacity
        if self.samples_per_insert is None:
            return True
        return self.diff <= self._top

    def can_sample(self, n: int) -> bool:
        """Whether a batch of ``n`` rows may be sampled now."""
        if self.queue_capacity is not None:
            return self.unsampled >= n
        if self.inserts < self.min_fill:
            return False
        if self.samples_per_insert is None:
            return not self.inserts_closed  # nothing paces the sampler: it ends with the inserts
        if self.inserts_closed:  # no more data: sample what the ratio allows, down to exactly the ratio
            return self.diff - n >= 0
        # The bottom is top - 2 * tolerance, so that rounding cannot open a gap between the edges (see _check_batch).
        return self.diff - n >= self._top - 2 * self.tolerance

    def inserted(self, n: int) -> None:
        self.inserts += n
        self._wake()

    def sampled(self, n: int) -> None:
        self.samples += n
        self._wake()

    def close_inserts(self) -> None:
        """No more rows will come: wake samplers so that they can finish."""
        self.inserts_closed = True
        self._wake()

    def check_capacity(self, capacity: int) -> None:
        """Raise ``ConfigError`` if a storage of ``capacity`` rows cannot serve this limiter.

        The writer stage calls it before its first insert::

            buffer.limiter.check_capacity(buffer.storage.capacity)
        """
        if self.queue_capacity is not None and self.queue_capacity > capacity:
            raise ConfigError(
                f"the queue holds up to {self.queue_capacity} unsampled rows but the storage only {capacity}: the "
                f"writer would overwrite rows before they are sampled; use RateLimiter.queue({capacity}, ...) or a "
                f"storage of at least {self.queue_capacity} rows"
            )
        if self.min_fill > capacity:
            raise ConfigError(
                f"min_fill={self.min_fill} rows is more than the storage holds (capacity={capacity} rows): the ring "
                f"overwrites its first rows before sampling may start; lower min_fill to at most {capacity} or raise "
                "the storage capacity"
            )

    def _queue_rows(self, n: int | None) -> int:
        if n is None:
            raise ValueError("a queue must know how many rows come: call wait_insert(n) / can_insert(n) with the "
                             "chunk's row count")
        return n

    def _check_batch(self, n: int) -> None:
        """Reject a batch of ``n`` rows that could stall both sides forever."""
        if self.samples_per_insert is not None and 2 * self.tolerance < n:
            # The band rule. Reverb inserts and samples one item at a time and checks each call against the band
            # *after* it would apply: an insert raises diff by samples_per_insert, a sample lowers it by 1. Both
            # are refused when max_diff - samples_per_insert < diff < min_diff + 1, which cannot happen when the
            # band is at least spi + 1 wide; Reverb asks for 2 * max(1, spi), a round bound above that sum.
            # Here an insert is a chunk of any number of rows checked *before* it applies (a chunk is admitted
            # whole while diff <= top), and a sample is a batch of n rows checked after it applies. Both are
            # refused when top < diff < top - 2 * tolerance + n, which cannot happen exactly when
            # 2 * tolerance >= n: the insert step drops out of the sum (any chunk enters from inside the band,
            # whatever its size or the ratio) and the sample step is n rows instead of 1. So the band must be at
            # least one batch wide, whatever samples_per_insert and the chunk size are. Floats: with the bottom
            # computed as top - 2 * tolerance, diff > top gives round(diff - n) >= round(top - 2 * tolerance).
            raise ConfigError(
                f"rate limiter: tolerance={self.tolerance} sampled rows is too narrow for batch_size={n}: batches of "
                f"{n} rows need tolerance >= {n / 2} (the band, 2 * tolerance, must hold one batch), or once inserts "
                f"wait above the band a batch may not fit below it and both sides stall. Pass tolerance >= {n / 2}, "
                f"or leave tolerance unset with RateLimiter(batch_size={n}) (the default is two batches)"
            )
        if self.queue_capacity is not None and n > self.batch_size:
            raise ConfigError(f"the queue was sized for batches of {self.batch_size} rows, got a batch of {n}; "
                              f"pass batch_size={n} to RateLimiter.queue")

    def _check_chunk(self, n: int) -> None:
        """Reject a queue insert of ``n`` rows that could stall both sides forever."""
        assert self.queue_capacity is not None
        # With u unsampled rows an insert of n waits while u + n > capacity and a batch of b waits while u < b:
        # both wait for some u when capacity - n < u < b, i.e. unless capacity >= n + b - 1.
        if n + self.batch_size - 1 > self.queue_capacity:
            raise ConfigError(
                f"a queue of capacity={self.queue_capacity} rows cannot take inserts of {n} rows with batches of "
                f"{self.batch_size}: with {max(0, self.queue_capacity - n + 1)} to {self.batch_size - 1} rows "
                f"unsampled the insert would overwrite unsampled rows and the batch is not full, so both wait "
                f"forever. The capacity must be >= rows per insert + batch_size - 1 = {n + self.batch_size - 1}: "
                f"raise it, or insert smaller chunks"
            )

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_until(self, ready: Callable[[], bool], what: str) -> float:
        start = time.perf_counter()
        while not ready():
            remaining = None if self.timeout is None else self.timeout - (time.perf_counter() - start)
            if remaining is not None and remaining <= 0:
                raise TimeoutError(self._timeout_message(what))
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                raise TimeoutError(self._timeout_message(what)) from None
        return time.perf_counter() - start

    def _timeout_message(self, what: str) -> str:
        mode = (f"queue capacity={self.queue_capacity}" if self.queue_capacity is not None
                else f"samples_per_insert={self.samples_per_insert}, min_fill={self.min_fill}")
        return (f"rate limiter: waited {self.timeout}s to {what} (inserted={self.inserts} rows, sampled="
                f"{self.samples} rows, {mode}); the other side is stalled or far slower: check the "
                "collector/learner, or raise the timeout")

    async def wait_insert(self, n: int | None = None) -> float:
        """Wait until a chunk of ``n`` rows may be inserted; return seconds waited. Queue mode needs ``n``."""
        if self.queue_capacity is not None:
            self._check_chunk(self._queue_rows(n))
        return await self._wait_until(lambda: self.can_insert(n), "insert")

    async def wait_sample(self, n: int) -> bool:
        """Wait until ``n`` rows may be sampled; False when inserts are closed and they never will be."""
        self._check_batch(n)
        start = time.perf_counter()
        await self._wait_until(lambda: self.inserts_closed or self.can_sample(n), "sample")
        self.sample_wait_s += time.perf_counter() - start
        return self.can_sample(n)

    def state_dict(self) -> dict[str, Any]:
        """The counters; the mode and its parameters come from the config that rebuilds the limiter."""
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inserts, samples = state["inserts"], state["samples"]
        if self.queue_capacity is not None and not 0 <= inserts - samples <= self.queue_capacity:
            raise ConfigError(
                f"cannot resume a queue of capacity={self.queue_capacity} from {inserts=} and {samples=}: "
                f"{inserts - samples} rows would be unsampled; the state comes from a ratio limiter or a larger "
                "queue: resume with the configuration that saved it"
            )
        self.inserts, self.samples = inserts, samples
