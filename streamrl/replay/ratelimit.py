"""The rate limiter: how many rows may be sampled per row inserted (Reverb's samples-per-insert idea).

Counting in rows, ``diff = inserted * samples_per_insert - sampled``. The limiter keeps ``diff`` inside a band of
``± tolerance`` around ``samples_per_insert * min_fill``:

* sampling waits until ``min_fill`` rows were inserted and while a batch would push ``diff`` below the band —
  the learner is ahead of collection;
* inserting waits while ``diff`` is above the band — collection is ahead of the learner.

Both waits are awaits (the event loop keeps running) with optional timeouts::

    limiter = RateLimiter(samples_per_insert=8.0, min_fill=1_000, tolerance=2_048)
    await limiter.wait_insert()          # writer stage, before storing a chunk
    limiter.inserted(chunk_rows)
    await limiter.wait_sample(256)       # sampler stage, before each batch
    limiter.sampled(256)

When the writer is done (``close_inserts``), sampling continues until exactly ``samples_per_insert`` rows were
sampled per row inserted; then ``wait_sample`` returns ``False`` and the sampler ends, which ends the learner.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from streamrl.errors import ConfigError


class RateLimiter:
    """Samples-per-insert with a tolerance band, a minimum fill, and awaitable waits."""

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
        if samples_per_insert is not None and self.tolerance < batch_size / 2:
            raise ConfigError(
                f"tolerance={self.tolerance} sampled rows is too narrow for batch_size={batch_size}: once inserts "
                f"block, a batch must still fit in the band, so tolerance must be >= batch_size / 2 "
                f"({batch_size / 2}); raise the tolerance"
            )
        self.timeout = timeout
        self.inserts = 0
        self.samples = 0
        self.inserts_closed = False
        self.sample_wait_s = 0.0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def diff(self) -> float:
        assert self.samples_per_insert is not None
        return self.inserts * self.samples_per_insert - self.samples

    def can_insert(self) -> bool:
        if self.samples_per_insert is None:
            return True
        return self.diff <= self.samples_per_insert * self.min_fill + self.tolerance

    def can_sample(self, n: int) -> bool:
        if self.inserts < self.min_fill:
            return False
        if self.samples_per_insert is None:
            return True
        if self.inserts_closed:  # no more data: sample what the ratio allows, down to exactly the ratio
            return self.diff - n >= 0
        return self.diff - n >= self.samples_per_insert * self.min_fill - self.tolerance

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

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_until(self, ready: Any, what: str) -> float:
        start = time.perf_counter()
        while not ready():
            if what == "sample" and self.inserts_closed:
                break
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            remaining = None if self.timeout is None else self.timeout - (time.perf_counter() - start)
            if remaining is not None and remaining <= 0:
                raise TimeoutError(self._timeout_message(what))
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                raise TimeoutError(self._timeout_message(what)) from None
        return time.perf_counter() - start

    def _timeout_message(self, what: str) -> str:
        return (f"rate limiter: waited {self.timeout}s to {what} (inserted={self.inserts} rows, sampled="
                f"{self.samples} rows, samples_per_insert={self.samples_per_insert}, min_fill={self.min_fill}); "
                "the other side is stalled or far slower: check the collector/learner, or raise the timeout")

    async def wait_insert(self) -> float:
        """Wait until inserting is allowed; return seconds waited."""
        return await self._wait_until(self.can_insert, "insert")

    async def wait_sample(self, n: int) -> bool:
        """Wait until ``n`` rows may be sampled; False when inserts are closed and they never will be."""
        if self.samples_per_insert is not None and self.tolerance < n / 2:
            raise ConfigError(
                f"rate limiter: batches of {n} rows need tolerance >= {n / 2} sampled rows, got {self.tolerance}; "
                f"once inserts block, a batch must still fit in the band. Pass tolerance= (or batch_size={n})"
            )
        start = time.perf_counter()
        await self._wait_until(lambda: self.can_sample(n), "sample")
        self.sample_wait_s += time.perf_counter() - start
        return self.can_sample(n)

    def state_dict(self) -> dict[str, Any]:
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inserts, self.samples = state["inserts"], state["samples"]
