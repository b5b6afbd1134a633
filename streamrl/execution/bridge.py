"""The process bridge: the edges between two processes of a run, over a Unix socket and shared memory.

Each edge that crosses a process boundary becomes a pair of bridge ends (:mod:`streamrl.execution.wiring`):

* TensorDict items (chunks, weights) travel through a ring of ``capacity`` shared-memory slots allocated from
  the first item; a message over the socket says "slot i is ready", the receiver copies the slot out and answers
  "ack i". An item that does not fit the slots' layout is pickled through the socket instead.
* Credits bound every edge: at most ``capacity`` items are in flight, so a slow consumer makes the producer wait
  exactly as an in-process stream would.
* Control messages (events, statistics, errors, stop and cancel) share the socket; :class:`Bridge` hands them to
  its owner (:mod:`streamrl.execution.worker` on both sides).

The same seam serves Ray actors (:mod:`streamrl.execution.ray_actor`): their channel carries the same messages
through actor calls, and has an ``object_store`` (``Channel.object_store`` is None here): TensorDict items then
travel as ``("ref", edge, carried)`` messages, ``carried`` being what that store made of the item (the weights: a
reference into Ray's object store; chunks: numpy arrays riding in a reply), and the same credits bound them.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

import anyio
import structlog
from tensordict import TensorDictBase

from streamrl.errors import BrokenStreamError, EndOfStream
from streamrl.streams import ReceiveStream, SendStream, open_stream

log = structlog.get_logger("streamrl.execution.bridge")
_HEADER = 4
FINAL = ("done", "error")  # a worker's last message; it then reads until the main process closes the socket


async def read_until_closed(channel: MessageChannel, seconds: float) -> None:
    """Read and drop whatever the peer still sends until it closes the socket (at most ``seconds``).

    The side that has said its last words closes second: a Unix socket closed while messages it never read wait
    in its buffer resets the connection, and the peer's read of the messages *it* was sent (the last words
    included) fails with ``ECONNRESET``.
    """
    with anyio.move_on_after(seconds):
        try:
            while True:
                await channel.receive()
        except PeerGone:
            pass


class PeerGone(ConnectionError):
    """The other process is gone: its socket reads end-of-file, or a write to it failed.

    Every failure of the socket comes out as this one error: a write racing the peer's death fails in several ways
    (``BrokenPipeError`` on the first write, ``ConnectionResetError`` from ``drain``, and from uvloop a
    ``RuntimeError`` "unable to perform operation on <UnixTransport closed=True>" on any write after that), and
    none of them is the run's error: the read loop reports why the peer went (:class:`WorkerDied` or its error).
    """


def frame(message: tuple[Any, ...], body: bytes = b"") -> bytes:
    """One message as sent over a bridge's socket: two 4-byte lengths, the pickled header, the payload."""
    head = pickle.dumps(message, protocol=5)
    return len(head).to_bytes(_HEADER, "big") + len(body).to_bytes(_HEADER, "big") + head + body


def _signature(td: TensorDictBase) -> tuple[Any, ...]:
    leaves = td.items(include_nested=True, leaves_only=True)
    return (tuple(td.batch_size), tuple((k, tuple(v.shape), v.dtype) for k, v in leaves))


class MessageChannel(Protocol):
    """What a bridge talks through: :class:`Channel` (a Unix socket) or a Ray actor's channel."""

    object_store: Any  # None, or where TensorDict items travel instead (put/get)

    def write(self, message: tuple[Any, ...], shared: Any = None) -> None: ...

    async def send(self, message: tuple[Any, ...], *, shared: Any = None) -> None: ...

    async def receive(self) -> tuple[tuple[Any, ...], bytes]: ...

    def close(self) -> None: ...


class Channel:
    """Messages over an asyncio stream pair: a small pickled header, then an optional shared-memory payload.

    The payload (shared-memory tensors, pickled with torch's reductions) is kept apart from the header because
    unpickling it fetches file descriptors from the sending process: if that process has already died, the
    payload fails to load, but the header still says which edge it belonged to and the messages after it
    (the sender's error report) are still read.
    """

    object_store: Any = None  # a channel to a Ray actor ships TensorDict items through Ray's object store instead

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def write(self, message: tuple[Any, ...], shared: Any = None) -> None:
        """Queue a message without waiting (the transport buffers it); :class:`PeerGone` if the peer is gone."""
        body = bytes(ForkingPickler.dumps(shared)) if shared is not None else b""
        if self.writer.is_closing():
            raise PeerGone("the other process closed the connection")
        try:
            self.writer.write(frame(message, body))
        except (RuntimeError, OSError) as exc:  # uvloop: RuntimeError once the transport closed
            raise PeerGone(str(exc)) from exc

    async def send(self, message: tuple[Any, ...], *, shared: Any = None) -> None:
        self.write(message, shared)
        try:
            await self.writer.drain()
        except (RuntimeError, OSError) as exc:
            raise PeerGone(str(exc)) from exc

    async def receive(self) -> tuple[tuple[Any, ...], bytes]:
        """The next message and its still-pickled shared payload (``b""`` if none)."""
        try:
            sizes = await self.reader.readexactly(2 * _HEADER)
            head = await self.reader.readexactly(int.from_bytes(sizes[:_HEADER], "big"))
            body = await self.reader.readexactly(int.from_bytes(sizes[_HEADER:], "big"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise PeerGone() from exc
        message: tuple[Any, ...] = pickle.loads(head)
        return message, body

    def close(self) -> None:
        self.writer.close()


class _Outbound:
    """Ships the items of one edge to the other process, at most ``capacity`` in flight."""

    def __init__(self, edge: str, capacity: int, local: ReceiveStream[Any], channel: MessageChannel) -> None:
        self.edge = edge
        self.capacity = max(1, capacity)
        self.local = local
        self.channel = channel
        self.in_flight = 0
        self.slots: list[TensorDictBase] | None = None
        self.signature: tuple[Any, ...] | None = None
        self.free: deque[int] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.done = anyio.Event()

    def ack(self, slot: int | None) -> None:
        self.in_flight -= 1
        if slot is not None:
            self.free.append(slot)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def run(self) -> None:
        try:
            while True:
                try:
                    item = await self.local.receive()
                except EndOfStream:
                    await self.channel.send(("close", self.edge))
                    return
                while self.in_flight >= self.capacity:
                    self._waiter = asyncio.get_running_loop().create_future()
                    start = time.perf_counter()
                    await self._waiter
                    self.local.waited_s += time.perf_counter() - start
                self.in_flight += 1
                await self._ship(item)
        except PeerGone:
            return  # the other process is gone; the read loop reports why
        finally:
            self.done.set()

    async def _ship(self, item: Any) -> None:
        store = self.channel.object_store
        if store is not None and isinstance(item, TensorDictBase):
            await self.channel.send(("ref", self.edge, store.put(item, self.edge)))
            return
        if isinstance(item, TensorDictBase):
            if self.slots is None:
                self.slots = [item.clone().share_memory_() for _ in range(self.capacity)]
                self.signature = _signature(item)
                self.free.extend(range(1, self.capacity))
                await self.channel.send(("slots", self.edge), shared=self.slots)
                await self.channel.send(("item", self.edge, 0))
                return
            if self.free and _signature(item) == self.signature:
                slot = self.free.popleft()
                self.slots[slot].update_(item)
                await self.channel.send(("item", self.edge, slot))
                return
        await self.channel.send(("obj", self.edge, item))


class _Inbound:
    """Receives the items of one edge and delivers them into the local stream, acking each one."""

    def __init__(self, edge: str, capacity: int, local: SendStream[Any], channel: MessageChannel) -> None:
        self.edge = edge
        self.local = local
        self.channel = channel
        self.slots: list[TensorDictBase] = []
        self.broken: str | None = None  # why the slots could not be mapped; items are then dropped
        self.pending_send, self.pending = open_stream(max(1, capacity), name=f"{edge} (arriving)")
        self.done = anyio.Event()

    def on_message(self, kind: str, payload: Any) -> None:
        if self.done.is_set() or self.pending_send.closed:
            return  # the edge already ended (its consumer or the other process is gone): drop
        if kind == "slots":
            self.slots = payload
        elif kind == "close":
            self.pending_send.close()
        else:  # "item" (a slot index), "obj" or "ref"; credits guarantee there is room
            self.pending_send.send_nowait((kind, payload))

    async def run(self) -> None:
        """Deliver what arrives, acking each item; once the other process is gone (acks fail), what already
        arrived is still delivered, until the pending queue is closed."""
        consumer_gone = False
        try:
            async for kind, payload in self.pending:
                if kind == "item" and self.broken is not None:
                    await self._ack(payload)
                    continue
                if kind == "item":
                    item = self.slots[payload].clone()
                    await self._ack(payload)
                elif kind == "ref":  # from Ray's object store; None: lost with the process that put it
                    item = await self.channel.object_store.get(payload, self.edge)
                    await self._ack(None)
                    if item is None:
                        continue
                else:
                    item = payload
                    await self._ack(None)
                if not consumer_gone:
                    try:
                        await self.local.send(item)
                    except BrokenStreamError:
                        consumer_gone = True  # keep acking so the other side can finish
        finally:
            self.local.close()
            self.done.set()

    async def _ack(self, slot: int | None) -> None:
        with contextlib.suppress(PeerGone):  # the other process is gone; the read loop reports why
            await self.channel.send(("ack", self.edge, slot))


class Bridge:
    """Both directions of every edge between this process and one other, plus a handler for control messages."""

    def __init__(
        self,
        channel: MessageChannel,
        outbound: dict[str, ReceiveStream[Any]],
        inbound: dict[str, SendStream[Any]],
        capacities: dict[str, int],
        on_control: Callable[[tuple[Any, ...]], Any],
    ) -> None:
        self.channel = channel
        self.outbound = {e: _Outbound(e, capacities[e], s, channel) for e, s in outbound.items()}
        self.inbound = {e: _Inbound(e, capacities[e], s, channel) for e, s in inbound.items()}
        self.on_control = on_control

    async def read_loop(self) -> None:
        """Dispatch messages until a final one (``done`` or ``error``: the peer's last words) or until the peer
        closes the socket (raises PeerGone)."""
        while True:
            message, shared = await self.channel.receive()
            kind = message[0]
            if kind == "ack":
                self.outbound[message[1]].ack(message[2])
            elif kind == "slots":
                inbound = self.inbound[message[1]]
                try:
                    inbound.on_message(kind, pickle.loads(shared))
                except Exception as exc:  # noqa: BLE001 - the sender died before we mapped its memory
                    inbound.broken = f"{type(exc).__name__}: {exc}"
                    log.warning("could not map the shared memory of an edge", edge=message[1], error=inbound.broken)
            elif kind in ("item", "obj", "ref", "close"):
                self.inbound[message[1]].on_message(kind, message[2] if len(message) > 2 else None)
            else:
                result = self.on_control(message)
                if asyncio.iscoroutine(result):
                    await result
                if kind in FINAL:
                    return

    def close_outbound(self) -> None:
        for out in self.outbound.values():
            out.local.close()
