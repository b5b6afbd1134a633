"""Worker processes: run a stage group (or each replica of one) in a process of its own, bridged to the main one.

asyncio gives concurrency, not parallelism. To let collection and learning use separate cores, a pipeline
places a stage group (say env + policy) in a worker process::

    pipeline.place("collect", "worker_process")

    pipeline.place("collect", "worker_process", replicas=4)    # four copies, four processes

The stages do not change. Each edge that crosses the process boundary becomes a bridge
(:mod:`streamrl.execution.bridge`: shared-memory slots, credits). A worker runs its stages and hooks through
:class:`~streamrl.execution.process.ProcessRun`, as the main process does. Events published in the worker are
forwarded to the main bus (tensor payloads stripped); hooks placed in the worker group see them locally first.

Replicas: replica ``r`` of a group runs with its own seed, its stages named ``env[r]``, ``policy[r]`` in events,
statistics and errors, and ``RunContext.replica == r`` (an env stage derives its env seeds and ``traj_id``s from it).

Workers are forked from a fork server that imported streamrl once (``warm_up`` starts it early), so a worker
starts in a fraction of a second instead of re-importing torch; the server imports streamrl from where the main
process did, whatever the current folder holds (:mod:`streamrl.forkserver`). The main event loop never blocks on
the worker: it awaits socket reads.

How a worker's failures surface (nothing hangs, no process is left behind):

* a stage (or hook) of the worker raises: the worker reports the error (stage name, traceback) and the main run
  raises :class:`StageFailed` naming that stage;
* the worker cannot rebuild its group (the pipeline module fails to import there, a stage class is missing): it
  reports that error, e.g. the ``ImportError``, as the failure of stage ``group <name>`` (``group <name>[r]``);
* the worker dies (SIGKILL, the out-of-memory killer, a segfault): its socket closes, the main process reaps it to
  learn how it ended, and the run raises :class:`WorkerDied` naming the group, the pid and the signal. Writes that
  race the death (an ack, a weights item sent into the closed socket) are not errors of their own
  (:class:`PeerGone`): the death is the run's error, whatever else it made fail.

A worker ignores SIGINT (the main process decides how to stop and tells it) and exits when the main process
disappears; a worker still closing when the run ends is killed after ``WorkerGroup.exit_timeout`` seconds, or,
after a second Ctrl-C, when the second that the closes share is up. The same seam — items and acks over a
message channel — serves Ray actors too (:mod:`streamrl.execution.ray_actor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import signal
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch

from streamrl.errors import RemoteError, StageFailed, WorkerDied
from streamrl.events import Event, EventBus
from streamrl.execution.bridge import Bridge, Channel, MessageChannel, PeerGone, frame, read_until_closed
from streamrl.execution.context import RunContext
from streamrl.execution.process import ProcessRun, calm_gc, loop_options
from streamrl.execution.wiring import Wiring
from streamrl.forkserver import worker_context
from streamrl.pipeline import MAIN, Pipeline
from streamrl.seeding import seed_everything
from streamrl.stages.base import Stage, StageContext
from streamrl.streams import SendStream, open_stream
from streamrl.summary import RunRecorder

log = structlog.get_logger("streamrl.execution.worker")
FINAL_READ_S = 5.0  # after its last message, how long a worker waits for the main process to close the socket
STATS_EVERY_S = 1.0  # how often a worker sends its busy fractions and stream counters
DELIVER_AFTER_DEATH_S = 2.0  # how long items that arrived before a worker died may take to reach their stream


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
    replica: int
    pipeline: Pipeline  # this group's stages and hooks, the other stages as _Elsewhere
    run_dir: str
    device: str
    seed: int
    threads: int
    forward_kinds: frozenset[str] | None  # None: every kind
    restarts: int = 0  # a Ray replica started again: how many times (fresh seeds and traj_ids)
    frames: dict[str, int] = field(default_factory=dict)  # env stage -> frames its earlier incarnations collected
    arrived: dict[str, Any] = field(default_factory=dict)  # edge -> an item already there at start (newest weights)


def _group_pipeline(pipeline: Pipeline, group: str) -> Pipeline:
    sub = Pipeline(pipeline.name, config=pipeline.config)
    for name, stage in pipeline.stages.items():
        if pipeline.stage_group[name] == group:
            sub.add(stage, group=group)
        else:
            sub.add(_Elsewhere(name, stage.inputs, stage.outputs, stage.optional), group=MAIN)
    sub.place(group, "worker_process", replicas=pipeline.replicas_of(group))
    sub.edges = list(pipeline.edges)
    sub.hooks = [(h, g) for h, g in pipeline.hooks if g == group]
    return sub


class WorkerGroup:
    """The main process's handle on one worker process (a group, or one replica of it): spawns it, bridges its
    edges, reaps it."""

    def __init__(
        self,
        pipeline: Pipeline,
        group: str,
        replica: int,
        wiring: Wiring,
        run: RunContext,
        *,
        index: int,
        preload: list[tuple[str, str]],
        threads: int = 1,
    ) -> None:
        self.group = group
        self.replica = replica
        self.label = pipeline.replica_label(group, replica)
        self.run_ctx = run
        self.index = index
        self.preload = preload
        self.threads = threads
        self.pipeline = pipeline
        edges = [e for e in pipeline.edges
                 if (pipeline.process_of(e.src_stage) == group) != (pipeline.process_of(e.dst_stage) == group)]
        self.capacities = {e.name: e.capacity for e in edges}
        self.outbound = {e.name: wiring.bridge_out[e.name][replica] for e in edges
                         if pipeline.process_of(e.dst_stage) == group}
        self.inbound = {e.name: wiring.bridge_in[e.name][replica] for e in edges
                        if pipeline.process_of(e.src_stage) == group}
        self.statistics: dict[str, Any] = {}  # the worker's ProcessRun.statistics(), sent when it ends
        self._finished = False
        self._error: BaseException | None = None
        self.process: Any = None
        self._channel: Channel | None = None
        self._sock: socket.socket | None = None
        self.exit_timeout = 30.0  # seconds a cancelled worker gets to close its stages before it is killed

    def _spec(self, *, restarts: int = 0, frames: dict[str, int] | None = None,
              arrived: dict[str, Any] | None = None) -> bytes:
        bus = self.run_ctx.bus
        kinds = None if bus._wildcard else frozenset(kind for kind, subs in bus._by_kind.items() if subs)
        spec = _WorkerSpec(
            group=self.group, replica=self.replica, pipeline=_group_pipeline(self.pipeline, self.group),
            run_dir=str(self.run_ctx.run_dir), device=str(self.run_ctx.device),
            seed=self.run_ctx.seed + 1000 * (self.index + 1) + 7 * restarts, threads=self.threads,
            forward_kinds=kinds, restarts=restarts, frames=frames or {}, arrived=arrived or {},
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
            self.statistics = message[1]
        elif kind == "error":
            _, stage, type_name, text, tb = message
            self._error = StageFailed(stage, RemoteError(type_name, text, tb))
        elif kind == "done":
            self._finished = True
        elif kind == "stop":  # a hook of the worker's group asked the run to stop
            self.run_ctx.request_stop(message[1] or f"stopped by group {self.label}")

    async def _deliver_events(self, delivered: anyio.Event) -> None:
        async for event in self._events_out:
            event.time = self.run_ctx.bus.now()  # re-stamped: the worker's clock started later than the run's
            await self.run_ctx.bus.forward(event)
        delivered.set()

    async def run(self) -> None:
        """Start the worker, bridge its edges until it ends, reap it; raise what it failed with."""
        await self._attempt(self._spec(), self.inbound)

    async def _attempt(self, spec: bytes, inbound: dict[str, SendStream[Any]]) -> None:
        """One worker from its start to its reaping (a Ray replica may take several); raise what it failed with."""
        self._events, self._events_out = open_stream(256, name=f"events from {self.label}")
        try:
            channel = await self._start(spec)
            if channel is not None:  # None: the run stopped before the worker started (Ray found it no room yet)
                await self._serve(channel, inbound)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reap()

    async def _start(self, spec: bytes) -> MessageChannel | None:
        """Spawn the worker process; the channel to it."""
        parent_sock, child_sock = socket.socketpair()
        self._sock = parent_sock
        ctx = worker_context()
        # Not a daemon: a group's envs may start their own subprocess workers. The worker exits when this process
        # goes away (its socket reports EOF), and run() reaps it on every exit path.
        self.process = ctx.Process(target=worker_main, args=(child_sock, self.label, self.preload, spec),
                                   name=f"streamrl-{self.label}", daemon=False)
        try:
            await anyio.to_thread.run_sync(self.process.start)
        finally:
            child_sock.close()
        await self.run_ctx.bus.publish("worker_started", f"group {self.label}",
                                       {"group": self.group, "replica": self.replica, "pid": self.process.pid})
        reader, writer = await asyncio.open_connection(sock=parent_sock)
        self._channel = Channel(reader, writer)
        return self._channel

    async def _death(self) -> BaseException:
        """Why the worker went without its last words: reap it to learn how (the signal that killed it)."""
        await anyio.to_thread.run_sync(self.process.join, 2.0)
        return WorkerDied(self.label, self.process.exitcode, self.process.pid)

    async def _serve(self, channel: MessageChannel, inbound: dict[str, SendStream[Any]]) -> None:
        """Bridge the edges over ``channel`` until the worker's last message (or its death); raise its error."""
        self._finished = False
        self._error = None
        bridge = Bridge(channel, self.outbound, inbound, self.capacities, self._on_control)
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
            except PeerGone:
                pass
            self._events.close()
            if self._error is not None:
                raise self._error
            if not self._finished:
                death = await self._death()
                for inb in bridge.inbound.values():  # what already arrived is delivered; then the death is raised
                    inb.pending_send.close()
                with anyio.move_on_after(DELIVER_AFTER_DEATH_S):
                    for inb in bridge.inbound.values():
                        await inb.done.wait()
                    await events_delivered.wait()  # its chunk events count its frames (a restart goes on from them)
                raise death
            for inb in bridge.inbound.values():  # deliver what already arrived
                await inb.done.wait()
            await events_delivered.wait()
            tg.cancel_scope.cancel()  # stop shipping to a worker that is gone...
        bridge.close_outbound()  # ...and let its upstream stages see that nobody listens any more

    def telemetry(self) -> dict[str, Any]:
        """Figures of this worker beyond its stages' (``summary.json["replicas"]``): a Ray replica's node,
        restarts and traffic."""
        return {}

    async def _forward_stop(self, channel: MessageChannel) -> None:
        await self.run_ctx.stop_event.wait()
        try:
            await channel.send(("stop", self.run_ctx.stop_reason))
        except PeerGone:
            pass

    async def _reap(self) -> None:
        """Make sure the worker process is gone: ask it to cancel, wait, terminate, kill."""
        proc = self.process
        if self._channel is not None:
            try:
                if proc is not None and proc.is_alive():
                    self._channel.write(("cancel",))
                self._channel.close()
            except PeerGone:
                pass
        if self._sock is not None:
            self._sock.close()
        if proc is None or proc.pid is None:
            return
        give_up_at = anyio.current_time() + self.exit_timeout  # its stages close (and flush) first
        while proc.is_alive() and anyio.current_time() < min(give_up_at, self.run_ctx.hurry_by or give_up_at):
            await anyio.to_thread.run_sync(proc.join, 0.1)  # short waits: a second Ctrl-C shortens the deadline
        if proc.is_alive():
            log.warning("worker did not exit in time; killing it", group=self.label, pid=proc.pid,
                        timeout_s=self.exit_timeout, hurried=self.run_ctx.hurry_by is not None)
            proc.kill()
            await anyio.to_thread.run_sync(proc.join, 2.0)


# -- the worker process ---------------------------------------------------------------------------------------
def worker_main(sock: socket.socket, label: str, preload: list[tuple[str, str]], spec_bytes: bytes) -> None:
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
        _report_start_failure(sock, label, preload, exc)
        sys.exit(1)
    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    code = anyio.run(_socket_worker, sock, spec, backend="asyncio", backend_options=loop_options())
    sys.exit(code)


async def _socket_worker(sock: socket.socket, spec: _WorkerSpec) -> int:
    reader, writer = await asyncio.open_connection(sock=sock)
    return await run_worker(Channel(reader, writer), spec)


def _report_start_failure(sock: socket.socket, label: str, preload: list[tuple[str, str]], exc: BaseException) -> None:
    """Tell the main process why this worker could not rebuild its group (as an ``error`` message)."""
    what = ", ".join(path for _, path in preload) or "the pickled stages"
    text = (f"{exc} (the worker process of group {label!r} failed to start while importing {what}: a worker "
            "imports the pipeline module and the stages' classes as the main process does)")
    tb = "".join(traceback.format_exception(exc))
    try:
        sock.sendall(frame(("error", f"group {label}", type(exc).__name__, text, tb)))
    except OSError:
        pass  # the main process is gone too


async def run_worker(channel: MessageChannel, spec: _WorkerSpec) -> int:
    """Run a worker's share of the pipeline, bridged to the main process over ``channel``; its exit code."""
    trains = any(s.needs_grad for s in spec.pipeline.stages_in(spec.group))
    with torch.inference_mode(not trains), calm_gc():
        return await _worker_body(channel, spec)


async def _worker_body(channel: MessageChannel, spec: _WorkerSpec) -> int:
    """Run this worker's share through :class:`ProcessRun`, bridged to the main process; report how it ended."""
    pipeline = spec.pipeline
    run = RunContext(Path(spec.run_dir), bus=EventBus(), device=torch.device(spec.device), seed=spec.seed,
                     pipeline=pipeline, recorder=RunRecorder(), process=spec.group, replica=spec.replica,
                     restarts=spec.restarts)
    for name, frames in spec.frames.items():  # a restarted replica goes on with its share of the frame budget
        pipeline.stages[name].frames = frames  # type: ignore[attr-defined]
    process = ProcessRun(pipeline, run)
    wiring = process.wiring
    for edge, item in spec.arrived.items():  # in the stream before the stages start: the policy acts with it at once
        wiring.bridge_in[edge][0].send_nowait(item)
    outbound_edges = {e.name for e in pipeline.edges if pipeline.process_of(e.src_stage) == spec.group
                      and pipeline.process_of(e.dst_stage) != spec.group}
    capacities = {e.name: e.capacity for e in pipeline.edges}
    stop_from_main = False

    def on_control(message: tuple[Any, ...]) -> None:
        nonlocal stop_from_main
        if message[0] == "stop":
            stop_from_main = True
            run.request_stop(message[1] or "stopped by the main process")
        elif message[0] == "cancel":
            run.cancel_now.set()

    bridge = Bridge(
        channel,
        {e: wiring.bridge_out[e][0] for e in outbound_edges},
        {e: sends[0] for e, sends in wiring.bridge_in.items()},
        capacities,
        on_control,
    )

    async def read() -> None:
        try:
            await bridge.read_loop()
        except PeerGone:
            run.cancel_now.set()  # the main process is gone: stop everything

    async def report_stop() -> None:
        """A stop requested here (a hook of this group) stops the whole run."""
        await run.stop_event.wait()
        if not stop_from_main:
            try:
                await channel.send(("stop", run.stop_reason))
            except PeerGone:
                pass

    async def forward_events() -> None:
        async def forward(event: Event) -> None:
            await channel.send(("event", event.without_tensors()))

        run.bus.subscribe(forward, spec.forward_kinds, name="forward-to-main")

    async def report_statistics() -> None:
        """The main process shows busy fractions and stream depths while the run lasts (streamrl top)."""
        with contextlib.suppress(PeerGone):
            while True:
                await anyio.sleep(STATS_EVERY_S)
                await channel.send(("stats", process.statistics()))

    async def ship_the_rest() -> None:
        for out in bridge.outbound.values():  # ship what is left, then wait until it was taken
            await out.done.wait()
            while out.in_flight and not run.cancel_now.is_set():
                await anyio.sleep(0.005)

    companions = [read, report_stop, report_statistics, *(out.run for out in bridge.outbound.values()),
                  *(inb.run for inb in bridge.inbound.values())]
    error = await process.execute(companions=companions, on_started=forward_events, after_stages=ship_the_rest)
    failure: tuple[str, BaseException] | None = None
    if error is not None and not isinstance(error, anyio.get_cancelled_exc_class()):
        label = f"group {pipeline.replica_label(spec.group, spec.replica)}"
        failure = (error.stage, error.error) if isinstance(error, StageFailed) else (label, error)
    with anyio.CancelScope(shield=True):
        try:
            await channel.send(("stats", process.statistics()))
            if failure is not None:
                stage, cause = failure
                tb = "".join(traceback.format_exception(cause))
                await channel.send(("error", stage, type(cause).__name__, str(cause), tb))
            else:
                await channel.send(("done",))
            await read_until_closed(channel, FINAL_READ_S)
            channel.close()
        except PeerGone:
            pass
    return 1 if failure is not None else 0
