"""Bounded streams: the only way stages exchange data.

A stream is a bounded FIFO split into a :class:`SendStream` and a :class:`ReceiveStream` half, in the manner of
anyio's memory object streams::

    send, receive = open_stream(capacity=2, name="env->writer")

    async def producer():
        with send:                       # closing the send half ends the stream for the receiver
            for chunk in chunks:
                await send.send(chunk)   # waits while the buffer holds `capacity` items

    async def consumer():
        async for chunk in receive:      # stops at EndOfStream, once every sender closed
            ...

Choosing a capacity: the buffer only absorbs jitter between producer and consumer; it never makes a slow
consumer faster. Small capacities (1–4) keep memory flat and keep the data fresh (policy lag stays low). A
capacity of 0 makes a rendezvous: ``send`` returns only once a receiver has taken the item.

``overflow="drop_oldest"`` makes a *lossy* stream: ``send`` never waits; when the buffer is full the oldest item is
dropped and counted. Lossy hooks and the latest-weights channel use it.

Fan-in: ``send.clone()`` gives another send half; the stream ends once every send half is closed. Fan-out by
cloning the receive half gives work sharing (each item goes to one receiver).

Every half records how long its owner waited; :meth:`SendStream.statistics` reports items, depth and waits, which
the runtime turns into per-stream statistics and per-stage busy fractions. The fast path (room in the buffer, or
an item ready) neither allocates nor reads the clock: a hop costs a few microseconds.

Streams run on asyncio (anyio's asyncio backend); a waiting call is cancelled like any other await.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Generic, Literal, TypeVar

from streamrl.errors import BrokenStreamError, ClosedStreamError, ConfigError, EndOfStream, WouldBlock

T = TypeVar("T")
Overflow = Literal["block", "drop_oldest"]


@dataclass(frozen=True)
class StreamStatistics:
    """A snapshot of one stream's counters."""

    name: str
    capacity: int
    items_sent: int
    items_received: int
    depth: int
    max_depth: int
    dropped: int
    producer_wait_s: float
    consumer_wait_s: float
    open_send_halves: int
    open_receive_halves: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _State:
    __slots__ = (
        "buffer",
        "capacity",
        "consumer_wait_s",
        "dropped",
        "items_received",
        "items_sent",
        "max_depth",
        "name",
        "open_receivers",
        "open_senders",
        "overflow",
        "producer_wait_s",
        "receive_waiters",
        "send_waiters",
        "taken_waiters",
    )

    def __init__(self, name: str, capacity: int, overflow: Overflow) -> None:
        self.name = name
        self.capacity = capacity
        self.overflow = overflow
        self.buffer: deque[Any] = deque()
        self.send_waiters: deque[asyncio.Future[None]] = deque()  # senders waiting for room
        self.taken_waiters: deque[asyncio.Future[None]] = deque()  # rendezvous senders waiting for a take
        self.receive_waiters: deque[asyncio.Future[None]] = deque()
        self.open_senders = 0
        self.open_receivers = 0
        self.items_sent = 0
        self.items_received = 0
        self.max_depth = 0
        self.dropped = 0
        self.producer_wait_s = 0.0
        self.consumer_wait_s = 0.0

    def can_put(self) -> bool:
        # Room in the buffer, or a receiver already waiting for an item (the rendezvous case).
        n = len(self.buffer)
        return n < self.capacity or n < len(self.receive_waiters)

    def put(self, item: Any) -> None:
        buffer = self.buffer
        buffer.append(item)
        self.items_sent += 1
        if len(buffer) > self.max_depth:
            self.max_depth = len(buffer)
        if self.receive_waiters:
            _wake_one(self.receive_waiters)

    def take(self) -> Any:
        item = self.buffer.popleft()
        self.items_received += 1
        if self.send_waiters:
            _wake_one(self.send_waiters)
        if self.taken_waiters:
            _wake_all(self.taken_waiters)
        return item

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            name=self.name, capacity=self.capacity, items_sent=self.items_sent,
            items_received=self.items_received, depth=len(self.buffer), max_depth=self.max_depth,
            dropped=self.dropped, producer_wait_s=self.producer_wait_s, consumer_wait_s=self.consumer_wait_s,
            open_send_halves=self.open_senders, open_receive_halves=self.open_receivers,
        )


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return


def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)


_loop = asyncio.get_running_loop


async def _wait(waiters: deque[asyncio.Future[None]]) -> float:
    """Park on a new future in ``waiters`` until woken; return the seconds spent waiting."""
    fut: asyncio.Future[None] = _loop().create_future()
    waiters.append(fut)
    start = time.perf_counter()
    try:
        await fut
    except BaseException:  # cancelled while waiting: leave the queue of waiters
        if fut in waiters:
            waiters.remove(fut)
        raise
    return time.perf_counter() - start


class SendStream(Generic[T]):
    """The sending half of a stream. Close it (or use ``with``) to end the stream for the receivers."""

    __slots__ = ("_closed", "_state", "waited_s")

    def __init__(self, state: _State) -> None:
        self._state = state
        self._closed = False
        self.waited_s = 0.0
        state.open_senders += 1

    @property
    def name(self) -> str:
        return self._state.name

    def send_nowait(self, item: T) -> None:
        """Put ``item`` without waiting; raise :class:`WouldBlock` when the buffer is full."""
        st = self._state
        buffer = st.buffer
        n = len(buffer)
        if n < st.capacity and st.open_receivers and not self._closed:  # fast path: room in the buffer
            buffer.append(item)
            st.items_sent += 1
            if n >= st.max_depth:
                st.max_depth = n + 1
            if st.receive_waiters:
                _wake_one(st.receive_waiters)
            return
        if self._closed:
            raise ClosedStreamError(f"send half of stream {st.name!r} was closed; it cannot send any more")
        if st.open_receivers == 0:
            if st.overflow == "drop_oldest":  # lossy: nobody listens any more, the item is dropped
                st.dropped += 1
                return
            raise BrokenStreamError(f"stream {st.name!r} has no receiver left; its consumer stopped")
        if st.can_put():
            st.put(item)
        elif st.overflow == "drop_oldest":
            st.buffer.popleft()
            st.dropped += 1
            st.put(item)
        else:
            raise WouldBlock(st.name)

    async def send(self, item: T) -> None:
        """Put ``item``, waiting while the buffer is full (the consumer is slower than the producer)."""
        st = self._state
        while True:
            try:
                self.send_nowait(item)
            except WouldBlock:
                waited = await _wait(st.send_waiters)
                self.waited_s += waited
                st.producer_wait_s += waited
                continue
            if st.capacity == 0:  # rendezvous: return once a receiver took the item (FIFO order)
                seq = st.items_sent
                while st.items_received < seq:
                    if st.open_receivers == 0:
                        raise BrokenStreamError(f"stream {st.name!r}: the receiver closed before taking the item")
                    waited = await _wait(st.taken_waiters)
                    self.waited_s += waited
                    st.producer_wait_s += waited
            return

    def clone(self) -> SendStream[T]:
        """Another send half of the same stream, for fan-in; the stream ends when all are closed."""
        if self._closed:
            raise ClosedStreamError(f"cannot clone the closed send half of stream {self._state.name!r}")
        return SendStream(self._state)

    def close(self) -> None:
        """Close this half. Once every send half is closed, receivers get EndOfStream after draining."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        st.open_senders -= 1
        if st.open_senders == 0:
            _wake_all(st.receive_waiters)

    async def aclose(self) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> StreamStatistics:
        return self._state.statistics()

    def __enter__(self) -> SendStream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SendStream({self._state.name!r}, closed={self._closed})"


class ReceiveStream(Generic[T]):
    """The receiving half of a stream; iterate it with ``async for`` until the senders close."""

    __slots__ = ("_closed", "_state", "waited_s")

    def __init__(self, state: _State) -> None:
        self._state = state
        self._closed = False
        self.waited_s = 0.0
        state.open_receivers += 1

    @property
    def name(self) -> str:
        return self._state.name

    def receive_nowait(self) -> T:
        """Take an item without waiting; :class:`WouldBlock` if none, :class:`EndOfStream` if ended."""
        st = self._state
        if self._closed:
            raise ClosedStreamError(f"receive half of stream {st.name!r} was closed; it cannot receive")
        if st.buffer:
            return st.take()  # type: ignore[no-any-return]
        if st.open_senders == 0:
            raise EndOfStream(st.name)
        raise WouldBlock(st.name)

    async def receive(self) -> T:
        """Take the next item, waiting while the buffer is empty."""
        st = self._state
        while True:
            if st.buffer and not self._closed:  # fast path: an item is ready
                item = st.buffer.popleft()
                st.items_received += 1
                if st.send_waiters:
                    _wake_one(st.send_waiters)
                if st.taken_waiters:
                    _wake_all(st.taken_waiters)
                return item  # type: ignore[no-any-return]
            if self._closed:
                raise ClosedStreamError(f"receive half of stream {st.name!r} was closed; it cannot receive")
            if st.open_senders == 0:
                raise EndOfStream(st.name)
            if st.send_waiters:  # a rendezvous sender may now hand its item over
                _wake_one(st.send_waiters)
            # wait for an item (inlined _wait: this is every stage's hot path)
            fut: asyncio.Future[None] = _loop().create_future()
            st.receive_waiters.append(fut)
            start = time.perf_counter()
            try:
                await fut
            except BaseException:
                if fut in st.receive_waiters:
                    st.receive_waiters.remove(fut)
                elif st.buffer and st.receive_waiters:  # woken, then cancelled: pass the wake-up on
                    _wake_one(st.receive_waiters)
                raise
            waited = time.perf_counter() - start
            self.waited_s += waited
            st.consumer_wait_s += waited

    def latest_nowait(self) -> T | None:
        """Drain the buffer and return the newest item, or None if nothing is waiting (weights channels)."""
        st = self._state
        item = None
        while st.buffer:
            item = st.take()
        return item

    def clone(self) -> ReceiveStream[T]:
        """Another receive half, for work sharing; each item goes to exactly one receiver."""
        if self._closed:
            raise ClosedStreamError(f"cannot clone the closed receive half of stream {self._state.name!r}")
        return ReceiveStream(self._state)

    def close(self) -> None:
        """Close this half. Once every receive half is closed, senders get BrokenStreamError."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        st.open_receivers -= 1
        if st.open_receivers == 0:
            st.buffer.clear()
            _wake_all(st.send_waiters)
            _wake_all(st.taken_waiters)

    async def aclose(self) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> StreamStatistics:
        return self._state.statistics()

    def __aiter__(self) -> ReceiveStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None

    def __enter__(self) -> ReceiveStream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReceiveStream({self._state.name!r}, closed={self._closed})"


def open_stream(
    capacity: int = 2, *, name: str = "stream", overflow: Overflow = "block"
) -> tuple[SendStream[Any], ReceiveStream[Any]]:
    """Create a bounded stream and return its ``(send, receive)`` halves.

    ``capacity`` is the number of items buffered (0 = rendezvous); ``overflow="drop_oldest"`` makes it lossy.
    """
    if not isinstance(capacity, int) or capacity < 0:
        raise ConfigError(f"stream {name!r}: capacity must be an int >= 0, got {capacity!r}")
    if overflow not in ("block", "drop_oldest"):
        raise ConfigError(f"stream {name!r}: overflow must be 'block' or 'drop_oldest', got {overflow!r}")
    if overflow == "drop_oldest" and capacity < 1:
        raise ConfigError(f"stream {name!r}: a lossy (drop_oldest) stream needs capacity >= 1, got {capacity}")
    state = _State(name, capacity, overflow)
    return SendStream(state), ReceiveStream(state)
