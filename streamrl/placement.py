"""Placement: run a stage group in a worker process, joined to the main process by shared memory.

asyncio gives concurrency, not parallelism. To let collection and learning use separate cores, a pipeline
places a stage group (say env + policy) in a worker process::

    pipeline.place("collect", "worker_process")

The stages do not change. Each edge that crosses the process boundary becomes a *bridge*:

* TensorDict items (chunks, weights) travel through a ring of ``capacity`` shared-memory slots allocated from
  the first item; a message over a Unix socket says "slot i is ready", the receiver copies the slot out and
  answers "ack i". An item that does not fit the slots' layout is pickled through the socket instead.
* Credits bound every bridge: at most ``capacity`` items are in flight, so a slow consumer makes the producer
  wait exactly as an in-process stream would.
* Events published in the worker are forwarded to the main bus (tensor payloads stripped); hooks placed in the
  worker group see them locally first.

Workers are forked from a fork server that imported streamrl once (``warm_up`` starts it early), so a worker
starts in a fraction of a second instead of re-importing torch; the server imports streamrl from where the main
process did, whatever the current folder holds (:mod:`streamrl.forkserver`). The main event loop never blocks on
the worker: it awaits socket reads.

How a worker's failures surface (nothing hangs, no process is left behind):

* a stage (or hook) of the worker raises: the worker reports the error (stage name, traceback) and the main run
  raises :class:`StageFailed` naming that stage;
* the worker cannot rebuild its group (the pipeline module fails to import there, a stage class is missing): it
  reports that error, e.g. the ``ImportError``, as the failure of stage ``group <name>``;
* the worker dies (SIGKILL, the out-of-memory killer, a segfault): its socket closes, the main process reaps it to
  learn how it ended, and the run raises :class:`WorkerDied` naming the group, the pid and the signal. Writes that
  race the death (an ack, a weights item sent into the closed socket) are not errors of their own
  (:class:`_PeerGone`): the death is the run's error, whatever else it made fail.

A worker ignores SIGINT (the main process decides how to stop and tells it) and exits when the main process
disappears; a worker still closing when the run ends is killed after ``WorkerGroup.exit_timeout`` seconds, or,
after a second Ctrl-C, when the second that the closes share is up. The same seam — items and acks over a
message channel — is where a Ray actor placement would plug in.
"""

from __future__ import annotations

import asyncio
import pickle
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch
from tensordict import TensorDictBase

from streamrl.errors import BrokenStreamError, EndOfStream, RemoteError, StageFailed, WorkerDied
from streamrl.events import Event, EventBus
from streamrl.forkserver import worker_context
from streamrl.pipeline import MAIN, Pipeline
from streamrl.runtime import RunContext, _run_stage, calm_gc, loop_options, seed_everything
from streamrl.stages.base import Stage, StageContext
from streamrl.streams import ReceiveStream, SendStream, open_stream
from streamrl.wiring import wire

log = structlog.get_logger("streamrl.placement")
_HEADER = 4


class _PeerGone(ConnectionError):
    """The other process is gone: its socket reads end-of-file, or a write to it failed.

    Every failure of the socket comes out as this one error: a write racing the peer's death fails in several ways
    (``BrokenPipeError`` on the first write, ``ConnectionResetError`` from ``drain``, and from uvloop a
    ``RuntimeError`` "unable to perform operation on <UnixTransport closed=True>" on any write after that), and
    none of them is the run's error: the read loop reports why the peer went (:class:`WorkerDied` or its error).
    """


def _frame(message: tuple[Any, ...], body: bytes = b"") -> bytes:
    """One message as sent over a bridge's socket: two 4-byte lengths, the pickled header, the payload."""
    head = pickle.dumps(message, protocol=5)
    return len(head).to_bytes(_HEADER, "big") + len(body).to_bytes(_HEADER, "big") + head + body


def _signature(td: TensorDictBase) -> tuple[Any, ...]:
    leaves = td.items(include_nested=True, leaves_only=True)
    return (tuple(td.batch_size), tuple((k, tuple(v.shape), v.dtype) for k, v in leaves))


class _Channel:
    """Messages over an asyncio stream pair: a small pickled header, then an optional shared-memory payload.

    The payload (shared-memory tensors, pickled with torch's reductions) is kept apart from the header because
    unpickling it fetches file descriptors from the sending process: if that process has already died, the
    payload fails to load, but the header still says which edge it belonged to and the messages after it
    (the sender's error report) are still read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def write(self, message: tuple[Any, ...], shared: Any = None) -> None:
        """Queue a message without waiting (the transport buffers it); :class:`_PeerGone` if the peer is gone."""
        body = bytes(ForkingPickler.dumps(shared)) if shared is not None else b""
        if self.writer.is_closing():
            raise _PeerGone("the other process closed the connection")
        try:
            self.writer.write(_frame(message, body))
        except (RuntimeError, OSError) as exc:  # uvloop: RuntimeError once the transport closed
            raise _PeerGone(str(exc)) from exc

    async def send(self, message: tuple[Any, ...], *, shared: Any = None) -> None:
        self.write(message, shared)
        try:
            await self.writer.drain()
        except (RuntimeError, OSError) as exc:
            raise _PeerGone(str(exc)) from exc

    async def receive(self) -> tuple[tuple[Any, ...], bytes]:
        """The next message and its still-pickled shared payload (``b""`` if none)."""
        try:
            sizes = await self.reader.readexactly(2 * _HEADER)
            head = await self.reader.readexactly(int.from_bytes(sizes[:_HEADER], "big"))
            body = await self.reader.readexactly(int.from_bytes(sizes[_HEADER:], "big"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _PeerGone() from exc
        message: tuple[Any, ...] = pickle.loads(head)
        return message, body

    def close(self) -> None:
        self.writer.close()


class _Outbound:
    """Ships the items of one edge to the other process, at most ``capacity`` in flight."""

    def __init__(self, edge: str, capacity: int, local: ReceiveStream[Any], channel: _Channel) -> None:
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
        except _PeerGone:
            return  # the other process is gone; the read loop reports why
        finally:
            self.done.set()

    async def _ship(self, item: Any) -> None:
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

    def __init__(self, edge: str, capacity: int, local: SendStream[Any], channel: _Channel) -> None:
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
        else:  # "item" (a slot index) or "obj"; credits guarantee there is room
            self.pending_send.send_nowait((kind, payload))

    async def run(self) -> None:
        consumer_gone = False
        try:
            async for kind, payload in self.pending:
                if kind == "item" and self.broken is not None:
                    await self.channel.send(("ack", self.edge, payload))
                    continue
                if kind == "item":
                    item = self.slots[payload].clone()
                    await self.channel.send(("ack", self.edge, payload))
                else:
                    item = payload
                    await self.channel.send(("ack", self.edge, None))
                if not consumer_gone:
                    try:
                        await self.local.send(item)
                    except BrokenStreamError:
                        consumer_gone = True  # keep acking so the other side can finish
        except _PeerGone:
            return  # the other process is gone; the read loop reports why
        finally:
            self.local.close()
            self.done.set()


class _Bridge:
    """Both directions of every edge between this process and one other, plus a handler for control messages."""

    def __init__(
        self,
        channel: _Channel,
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
        """Dispatch messages until the peer closes the socket (raises _PeerGone)."""
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
            elif kind in ("item", "obj", "close"):
                self.inbound[message[1]].on_message(kind, message[2] if len(message) > 2 else None)
            else:
                result = self.on_control(message)
                if asyncio.iscoroutine(result):
                    await result

    def close_outbound(self) -> None:
        for out in self.outbound.values():
            out.local.close()


class _Elsewhere(Stage):
    """Stands for a stage of another process, so that the worker can wire its side of the edges."""

    def __init__(self, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], optional: frozenset[str]):
        super().__init__(name)
        self.inputs = inputs  # type: ignore[misc]
        self.outputs = outputs  # type: ignore[misc]
        self.optional = optional  # type: ignore[misc]

    async def run(self, ctx: StageContext) -> None:
        raise RuntimeError(f"stage {self.name!r} runs in another process; this placeholder only wires its edges")


@dataclass
class _WorkerSpec:
    group: str
    pipeline: Pipeline  # this group's stages and hooks, the other stages as _Elsewhere
    run_dir: str
    device: str
    seed: int
    threads: int
    forward_kinds: frozenset[str] | None  # None: every kind


def _group_pipeline(pipeline: Pipeline, group: str) -> Pipeline:
    sub = Pipeline(pipeline.name, config=pipeline.config)
    for name, stage in pipeline.stages.items():
        if pipeline.stage_group[name] == group:
            sub.add(stage, group=group)
        else:
            sub.add(_Elsewhere(name, stage.inputs, stage.outputs, stage.optional), group=MAIN)
    sub.place(group, "worker_process")
    sub.edges = list(pipeline.edges)
    sub.hooks = [(h, g) for h, g in pipeline.hooks if g == group]
    return sub


class WorkerGroup:
    """The main process's handle on one worker process: spawns it, bridges its edges, reaps it."""

    def __init__(
        self,
        pipeline: Pipeline,
        group: str,
        wiring: Any,
        run: RunContext,
        *,
        index: int,
        preload: list[tuple[str, str]],
        threads: int = 1,
    ) -> None:
        self.group = group
        self.run_ctx = run
        self.index = index
        self.preload = preload
        self.threads = threads
        self.pipeline = pipeline
        edges = [e for e in pipeline.edges
                 if (pipeline.process_of(e.src_stage) == group) != (pipeline.process_of(e.dst_stage) == group)]
        self.capacities = {e.name: e.capacity for e in edges}
        self.outbound = {e.name: wiring.bridge_out[e.name] for e in edges if pipeline.process_of(e.dst_stage) == group}
        self.inbound = {e.name: wiring.bridge_in[e.name] for e in edges if pipeline.process_of(e.src_stage) == group}
        self.stream_statistics: dict[str, Any] = {}
        self.busy: dict[str, float] = {}
        self._finished = False
        self._error: BaseException | None = None
        self.process: Any = None
        self._channel: _Channel | None = None
        self.exit_timeout = 30.0  # seconds a cancelled worker gets to close its stages before it is killed

    def _spec(self) -> bytes:
        bus = self.run_ctx.bus
        kinds = None if bus._wildcard else frozenset(kind for kind, subs in bus._by_kind.items() if subs)
        spec = _WorkerSpec(
            group=self.group, pipeline=_group_pipeline(self.pipeline, self.group), run_dir=str(self.run_ctx.run_dir),
            device=str(self.run_ctx.device), seed=self.run_ctx.seed + 1000 * (self.index + 1), threads=self.threads,
            forward_kinds=kinds,
        )
        try:
            return pickle.dumps(spec, protocol=5)
        except Exception as exc:
            raise StageFailed(
                f"group {self.group}",
                TypeError(f"the stages and hooks of group {self.group!r} must be picklable to run in a worker "
                          f"process: {exc}; build envs lazily and keep open files out of stage constructors"),
            ) from exc

    async def _on_control(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":  # handed to a task of its own: a slow hook must not stall acks and control messages
            await self._events.send(message[1])
        elif kind == "stats":
            self.stream_statistics = message[1]["streams"]
            self.busy = message[1]["busy"]
        elif kind == "error":
            _, stage, type_name, text, tb = message
            self._error = StageFailed(stage, RemoteError(type_name, text, tb))
        elif kind == "done":
            self._finished = True
        elif kind == "stop":  # a hook of the worker's group asked the run to stop
            self.run_ctx.request_stop(message[1] or f"stopped by group {self.group}")

    async def _deliver_events(self, delivered: anyio.Event) -> None:
        async for event in self._events_out:
            event.time = self.run_ctx.bus.now()  # re-stamped: the worker's clock started later than the run's
            await self.run_ctx.bus.forward(event)
        delivered.set()

    async def run(self) -> None:
        spec = self._spec()
        parent_sock, child_sock = socket.socketpair()
        ctx = worker_context()
        # Not a daemon: a group's envs may start their own subprocess workers. The worker exits when this process
        # goes away (its socket reports EOF), and run() reaps it on every exit path.
        self.process = ctx.Process(target=worker_main, args=(child_sock, self.group, self.preload, spec),
                                   name=f"streamrl-{self.group}", daemon=False)
        self._events, self._events_out = open_stream(256, name=f"events from {self.group}")
        try:
            try:
                await anyio.to_thread.run_sync(self.process.start)
            finally:
                child_sock.close()
            await self.run_ctx.bus.publish("worker_started", f"group {self.group}",
                                           {"group": self.group, "pid": self.process.pid})
            reader, writer = await asyncio.open_connection(sock=parent_sock)
            channel = self._channel = _Channel(reader, writer)
            bridge = _Bridge(channel, self.outbound, self.inbound, self.capacities, self._on_control)
            async with anyio.create_task_group() as tg:
                for out in bridge.outbound.values():
                    tg.start_soon(out.run)
                for inb in bridge.inbound.values():
                    tg.start_soon(inb.run)
                tg.start_soon(self._forward_stop, channel)
                events_delivered = anyio.Event()
                tg.start_soon(self._deliver_events, events_delivered)
                try:
                    await bridge.read_loop()
                except _PeerGone:
                    pass
                self._events.close()
                if self._error is not None:
                    raise self._error
                if not self._finished:  # it died: reap it to learn how (the signal that killed it)
                    await anyio.to_thread.run_sync(self.process.join, 2.0)
                    raise WorkerDied(self.group, self.process.exitcode, self.process.pid)
                for inb in bridge.inbound.values():  # deliver what already arrived
                    await inb.done.wait()
                await events_delivered.wait()
                tg.cancel_scope.cancel()  # stop shipping to a worker that is gone...
            bridge.close_outbound()  # ...and let its upstream stages see that nobody listens any more
        finally:
            with anyio.CancelScope(shield=True):
                await self._reap(parent_sock)

    async def _forward_stop(self, channel: _Channel) -> None:
        await self.run_ctx.stop_event.wait()
        try:
            await channel.send(("stop", self.run_ctx.stop_reason))
        except _PeerGone:
            pass

    async def _reap(self, sock: socket.socket) -> None:
        """Make sure the worker process is gone: ask it to cancel, wait, terminate, kill."""
        proc = self.process
        if self._channel is not None:
            try:
                if proc is not None and proc.is_alive():
                    self._channel.write(("cancel",))
                self._channel.close()
            except _PeerGone:
                pass
        sock.close()
        if proc is None or proc.pid is None:
            return
        give_up_at = anyio.current_time() + self.exit_timeout  # its stages close (and flush) first
        while proc.is_alive() and anyio.current_time() < min(give_up_at, self.run_ctx.hurry_by or give_up_at):
            await anyio.to_thread.run_sync(proc.join, 0.1)  # short waits: a second Ctrl-C shortens the deadline
        if proc.is_alive():
            log.warning("worker did not exit in time; killing it", group=self.group, pid=proc.pid,
                        timeout_s=self.exit_timeout, hurried=self.run_ctx.hurry_by is not None)
            proc.kill()
            await anyio.to_thread.run_sync(proc.join, 2.0)


# -- the worker process ---------------------------------------------------------------------------------------
async def _drain_then_set(sub: Any, drained: anyio.Event) -> None:
    await sub.drain()
    drained.set()


def worker_main(sock: socket.socket, group: str, preload: list[tuple[str, str]], spec_bytes: bytes) -> None:
    """Entry point of a worker process (forked by the fork server): rebuild the group, run it, report how it ended.

    A worker that cannot rebuild its group (the pipeline module fails to import here, a stage class cannot be
    found) reports that error to the main process, which raises it as the run's error, before exiting with 1.
    """
    # Ctrl-C (and a SIGTERM sent to the whole process group) reach the worker too; the main process decides how
    # to stop and tells the worker; a worker whose main process is gone notices the closed socket and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from streamrl.loader import load_module

        for module_name, path in preload:
            load_module(path, module_name)
        spec: _WorkerSpec = pickle.loads(spec_bytes)
    except BaseException as exc:
        _report_start_failure(sock, group, preload, exc)
        sys.exit(1)
    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    code = anyio.run(_worker_async, sock, spec, backend="asyncio", backend_options=loop_options())
    sys.exit(code)


def _report_start_failure(sock: socket.socket, group: str, preload: list[tuple[str, str]], exc: BaseException) -> None:
    """Tell the main process why this worker could not rebuild its group (as an ``error`` message)."""
    what = ", ".join(path for _, path in preload) or "the pickled stages"
    text = (f"{exc} (the worker process of group {group!r} failed to start while importing {what}: a worker "
            "imports the pipeline module and the stages' classes as the main process does)")
    tb = "".join(traceback.format_exception(exc))
    try:
        sock.sendall(_frame(("error", f"group {group}", type(exc).__name__, text, tb)))
    except OSError:
        pass  # the main process is gone too


async def _worker_async(sock: socket.socket, spec: _WorkerSpec) -> int:
    trains = any(s.needs_grad for s in spec.pipeline.stages_in(spec.group))
    with torch.inference_mode(not trains), calm_gc():
        return await _worker_body(sock, spec)


async def _worker_body(sock: socket.socket, spec: _WorkerSpec) -> int:
    reader, writer = await asyncio.open_connection(sock=sock)
    channel = _Channel(reader, writer)
    bus = EventBus()
    run = RunContext(Path(spec.run_dir), bus=bus, device=torch.device(spec.device), seed=spec.seed,
                     config=spec.pipeline.config, process=spec.group)
    pipeline = spec.pipeline
    wiring = wire(pipeline, spec.group)
    stages = pipeline.stages_in(spec.group)
    contexts = [StageContext(s, run, wiring.inputs[s.name], wiring.outputs[s.name]) for s in stages]
    hooks = pipeline.hooks_in(spec.group)
    outbound_edges = {e.name for e in pipeline.edges if pipeline.process_of(e.src_stage) == spec.group
                      and pipeline.process_of(e.dst_stage) != spec.group}
    capacities = {e.name: e.capacity for e in pipeline.edges}
    cancel = anyio.Event()

    stop_from_main = False

    def on_control(message: tuple[Any, ...]) -> None:
        nonlocal stop_from_main
        if message[0] == "stop":
            stop_from_main = True
            run.request_stop(message[1] or "stopped by the main process")
        elif message[0] == "cancel":
            cancel.set()

    async def report_stop() -> None:
        """A stop requested here (a hook of this group) stops the whole run."""
        await run.stop_event.wait()
        if not stop_from_main:
            try:
                await channel.send(("stop", run.stop_reason))
            except _PeerGone:
                pass

    async def forward(event: Event) -> None:
        await channel.send(("event", event.without_tensors()))

    bridge = _Bridge(
        channel,
        {e: wiring.bridge_out[e] for e in outbound_edges},
        {e: s for e, s in wiring.bridge_in.items()},
        capacities,
        on_control,
    )
    failure: tuple[str, BaseException] | None = None
    started_hooks = []
    try:
        for hook in hooks:
            await hook.start(run)
            started_hooks.append(hook)
            bus.add_hook(hook)
        bus.subscribe(forward, spec.forward_kinds, name="forward-to-main")
        async with anyio.create_task_group() as tg:
            async def read() -> None:
                try:
                    await bridge.read_loop()
                except _PeerGone:
                    cancel.set()  # the main process is gone: stop everything

            async def cancel_on_request() -> None:
                await cancel.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(cancel_on_request)
            tg.start_soon(report_stop)
            drains = []
            for sub in bus.lossy():
                drained = anyio.Event()
                drains.append(drained)
                tg.start_soon(_drain_then_set, sub, drained)
            for out in bridge.outbound.values():
                tg.start_soon(out.run)
            for inb in bridge.inbound.values():
                tg.start_soon(inb.run)
            async with anyio.create_task_group() as stages_tg:
                for ctx in contexts:
                    stages_tg.start_soon(_run_stage, ctx.stage, ctx)
            bus.close()
            for drained in drains:  # lossy hooks handle what they buffered
                await drained.wait()
            for out in bridge.outbound.values():  # ship what is left, then wait until it was taken
                await out.done.wait()
                while out.in_flight and not cancel.is_set():
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    except BaseException as exc:  # noqa: BLE001 - reported to the main process below
        from streamrl.runtime import _first_failure

        err = _first_failure(exc)
        if not isinstance(err, anyio.get_cancelled_exc_class()):
            stage = err.stage if isinstance(err, StageFailed) else f"group {spec.group}"
            cause = err.error if isinstance(err, StageFailed) else err
            failure = (stage, cause)
    finally:
        with anyio.CancelScope(shield=True):
            for ctx in contexts:
                try:
                    await ctx.stage.close(ctx)
                except Exception as exc:
                    failure = failure or (ctx.name, exc)
            for hook in reversed(started_hooks):
                try:
                    await hook.close(run)
                except Exception as exc:
                    failure = failure or (f"hook {hook.name}", exc)
            stats = {
                "streams": {n: s.as_dict() for n, s in wiring.statistics().items()},
                "busy": {c.name: round(c.busy_fraction(), 4) for c in contexts},
            }
            try:
                await channel.send(("stats", stats))
                if failure is not None:
                    stage, cause = failure
                    tb = "".join(traceback.format_exception(cause))
                    await channel.send(("error", stage, type(cause).__name__, str(cause), tb))
                else:
                    await channel.send(("done",))
                channel.close()
            except _PeerGone:
                pass
    return 1 if failure is not None else 0
