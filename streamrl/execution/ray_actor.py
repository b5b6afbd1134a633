"""Ray actors: the replicas of a stage group anywhere in a Ray cluster, ``placement="ray_actor"``.

A pipeline file does not change; a setting moves its collector replicas onto Ray actors while the replay, sampler,
learner and hooks stay in the main process (the Ray driver)::

    p.place("collect", "ray_actor", replicas=8, resources={"CPU": 1}, max_restarts=3)
    # or: p.add_collector(..., placement="ray_actor", replicas=8); from the CLI:
    # streamrl run pipelines/dqn_cartpole.py --set placement=ray_actor --set replicas=8 [--ray-address ADDR]

Each replica is one actor running the same per-process execution as a worker process
(:func:`streamrl.execution.worker.run_worker`, inside the actor's event loop). The bridge's messages (items, acks,
events, statistics, errors, stop, cancel) travel through actor calls (:class:`_DriverChannel`,
:class:`_ActorChannel`): the main process polls the actor with ``take``, which carries the main process's own
messages of the moment and returns the actor's (one call per round trip: a Ray call costs about a millisecond),
and sends what cannot wait for the next poll with ``deliver``; both are numbered, so the actor takes them in
order. TensorDict items travel as numpy arrays (:func:`to_arrays`; read back without a copy, then copied once into
tensors, as the shared-memory bridge copies out of its slots): chunks inside the poll replies (through Ray's object
store when large), the learner's weights put into the object store once per version whatever the number of
replicas (:class:`_PutOnce`), each replica fetching the newest. The edge's credits still bound what is in flight,
so a slow learner makes remote collectors wait.

Where Ray comes from: a run joins the Ray instance this process is connected to, or the one at ``ray_address``
(``--ray-address``, or ``RAY_ADDRESS``), or else starts a local one for the run (:func:`ray_session`).

Faults: a replica whose actor dies (its node removed, its process killed) is started again, up to the group's
``max_restarts`` (:class:`~streamrl.pipeline.RayOptions`); the learner and the other replicas go on meanwhile.
The new actor gets fresh env seeds and ``traj_id``s (``RunContext.replica_id``) and goes on with the replica's
share of the frame budget, minus what its earlier actors collected (an env stage counts a chunk when it publishes
it: the chunks still in the dead actor or in flight, at most the edge's capacity plus two, are lost with it and
counted; they were never written). One death more fails the run with :class:`~streamrl.errors.
ReplicaLost` naming the replica and its node. An error raised by a stage of the replica is not a death: it fails
the run as in a worker process (a bug would recur). ``summary.json`` counts restarts per replica, with its node,
the bytes moved each way and the time spent waiting on the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog
import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import PipelineError, ReplicaLost
from streamrl.execution.bridge import PeerGone
from streamrl.execution.context import RunContext
from streamrl.execution.process import first_failure
from streamrl.execution.wiring import Wiring
from streamrl.execution.worker import WorkerGroup
from streamrl.pipeline import RAY_INSTALL, Pipeline

log = structlog.get_logger("streamrl.execution.ray")
PLACE_TIMEOUT_S = 120.0  # how long a replica may wait for Ray to find it room before the run fails
TAKE_WAIT_S = 1.0  # a long poll for the actor's messages returns empty after this long
UNAVAILABLE_TRIES = 4  # polls of an actor Ray says is unreachable for a moment, 0.5 s apart, before it counts as dead
SWITCH_INTERVAL_S = 0.0005
_CLOSED = ("__closed__",)  # the main process closed the channel: the actor's reads end


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise PipelineError(f"placement 'ray_actor' needs Ray: {RAY_INSTALL}") from exc
    return ray


@contextlib.contextmanager
def ray_session(pipeline: Pipeline, address: str | None) -> Iterator[None]:
    """Connect to Ray for a run with ``ray_actor`` groups (nothing to do without): keep the connection this process
    has, or join ``address`` (``RAY_ADDRESS``), or start a local instance, which is shut down when the run ends.

    A local instance offers at least one CPU per replica: on one machine a replica takes a core like a worker
    process does, and more replicas than cores share them as worker processes would."""
    groups = pipeline.ray_groups()
    if not groups:
        yield
        return
    ray = _ray()
    if ray.is_initialized():
        if address:
            log.warning("already connected to Ray: --ray-address is not used", ray_address=address)
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if address is None:  # "local": a new instance, never one a `ray start` left running on this machine
        wanted = sum(pipeline.replicas_of(g) * dict(pipeline.ray_options[g].resources).get("CPU", 0) for g in groups)
        options["num_cpus"] = max(os.cpu_count() or 1, math.ceil(wanted))
    # A delivery to an actor that has died is not news: Ray would log each one as an unhandled error.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    started = time.perf_counter()
    try:
        ray.init(address=address or "local", **options)
    except ConnectionError as exc:
        raise PipelineError(f"could not join the Ray cluster at {address!r}: {exc}; start one with `ray start "
                            "--head` or leave --ray-address out to start a local instance") from exc
    log.info("ray ready", address=address or "local", seconds=round(time.perf_counter() - started, 2))
    try:
        yield
    finally:
        ray.shutdown()


# -- TensorDicts in the object store --------------------------------------------------------------------------
def to_arrays(td: TensorDictBase) -> dict[str, Any]:
    """A TensorDict as numpy arrays (which Ray's object store reads back without a copy); leaves numpy cannot
    hold (bfloat16) stay tensors."""
    leaves: list[tuple[Any, Any]] = []
    for key, value in td.items(include_nested=True, leaves_only=True):
        leaf: Any = value
        if isinstance(value, torch.Tensor):
            leaf = value.detach().cpu()
            with contextlib.suppress(TypeError):
                leaf = leaf.numpy()
        leaves.append((key, leaf))
    return {"batch_size": tuple(td.batch_size), "leaves": leaves}


def from_arrays(payload: dict[str, Any]) -> TensorDict:
    """The TensorDict again, its tensors copied out of the (read-only) object store."""
    td = TensorDict(batch_size=payload["batch_size"])
    for key, value in payload["leaves"]:
        td.set(key, torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value)
    return td


def _nbytes(payload: dict[str, Any]) -> int:
    return sum(int(getattr(v, "nbytes", 0)) for _, v in payload["leaves"])


class Traffic:
    """What one end of a replica's channel moved (TensorDict items put and got) and how long it waited for objects
    of Ray's object store: the weights, which the actor fetches. Chunks come inside the replies to the main
    process's polls, so their transfer is part of the poll and is not counted as a wait."""

    def __init__(self) -> None:
        self.bytes_in = 0  # items got (in the main process: chunks)
        self.bytes_out = 0  # items put (in the main process: weights)
        self.items_in = 0
        self.items_out = 0
        self.wait_s = 0.0  # awaiting objects of the object store (the actor's weights)

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "items_in": self.items_in,
                "items_out": self.items_out, "object_store_wait_s": round(self.wait_s, 4)}


class _PutOnce:
    """The main process's puts, shared by every replica of a run: an item fanned out to N replicas (the learner's
    weights) is put once, and each replica's message carries the same reference."""

    def __init__(self) -> None:
        self._item: Any = None
        self._ref: Any = None
        self._nbytes = 0

    def put(self, item: TensorDictBase) -> tuple[Any, int]:
        if item is not self._item:
            payload = to_arrays(item)
            self._item, self._ref, self._nbytes = item, _ray().put(payload), _nbytes(payload)
        return self._ref, self._nbytes


class _Store:
    """A channel's ``object_store``: what a ``ref`` message carries for a TensorDict item, and the item back.

    From the main process (the learner's weights, fanned out): one ``ray.put`` per item, its reference in a list so
    that Ray hands the reference over instead of the object, and each replica fetches it. From an actor (chunks):
    the arrays themselves, which ride in the reply to the main process's next ``take``: Ray stores a large reply in
    its object store, owned by the main process (it survives the actor), and reads it back without a copy; a small
    one comes inline. Either way one round trip per batch of messages instead of a put and a fetch per chunk."""

    def __init__(self, traffic: Traffic, put_once: _PutOnce | None = None,
                 last_put: dict[str, Any] | None = None) -> None:
        self.traffic = traffic
        self.put_once = put_once
        self.last_put = last_put  # the main process's: edge -> the last item put (a restarted replica's weights)

    def put(self, item: TensorDictBase, edge: str) -> tuple[str, Any, int]:
        if self.last_put is not None:
            self.last_put[edge] = item
        if self.put_once is not None:
            ref, nbytes = self.put_once.put(item)
            carried: tuple[str, Any, int] = ("object", [ref], nbytes)
        else:
            arrays = to_arrays(item)
            carried = ("inline", arrays, _nbytes(arrays))
        self.traffic.bytes_out += carried[2]
        self.traffic.items_out += 1
        return carried

    async def get(self, carried: tuple[str, Any, int], edge: str) -> TensorDict | None:
        """The item, or None if it was lost with the process that put it."""
        how, payload, nbytes = carried
        if how == "object":
            started = time.perf_counter()
            try:
                payload = await payload[0]
            except _ray().exceptions.RayError as exc:
                log.warning("an item was lost with the process that put it", edge=edge, error=type(exc).__name__)
                return None
            finally:
                self.traffic.wait_s += time.perf_counter() - started
        self.traffic.bytes_in += nbytes
        self.traffic.items_in += 1
        return from_arrays(payload)


# -- the channels ------------------------------------------------------------------------------------------------
class _DriverChannel:
    """The main process's end. What it writes is batched: the writes of one pass of the event loop go out in one
    numbered ``deliver`` call, or ride along with the next ``take``, the long poll that brings the actor's messages
    (chunks included): one call per round trip where possible, as Ray calls cost about a millisecond."""

    def __init__(self, actor: Any, store: _Store) -> None:
        self.actor = actor
        self.object_store = store
        self.death: BaseException | None = None  # the Ray error that said the actor is gone
        self.death_at: float | None = None  # when (perf_counter)
        self._seq = 0
        self._outgoing: list[tuple[Any, ...]] = []
        self._flush_soon = False
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._closed = False

    def write(self, message: tuple[Any, ...], shared: Any = None) -> None:
        if self._closed or self.death is not None:
            raise PeerGone("the replica's actor is gone")
        self._outgoing.append(message)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _batch(self) -> tuple[int, list[tuple[Any, ...]]]:
        batch, self._outgoing = self._outgoing, []
        if batch:
            self._seq += 1
        return self._seq, batch

    def _flush(self) -> None:
        self._flush_soon = False
        if self._outgoing and self.death is None:
            self.actor.deliver.remote(*self._batch())

    async def send(self, message: tuple[Any, ...], *, shared: Any = None) -> None:
        self.write(message)

    async def receive(self) -> tuple[tuple[Any, ...], bytes]:
        while not self._inbox:
            if self.death is not None:
                raise PeerGone(str(self.death))
            await asyncio.sleep(0)  # let the acks of what just arrived be written: they go with this take
            seq, batch = self._batch()
            self._inbox.extend(await self._take(seq, batch))
        return self._inbox.popleft(), b""

    async def _take(self, seq: int, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """One poll; a dead actor (or a reply lost with its node) raises PeerGone, remembering why. An actor that
        is unreachable for a moment is asked again, up to :data:`UNAVAILABLE_TRIES` times."""
        exceptions = _ray().exceptions
        for attempt in range(UNAVAILABLE_TRIES):
            try:
                reply: list[tuple[Any, ...]] = await self.actor.take.remote(TAKE_WAIT_S, seq, batch)
                return reply
            except exceptions.ActorUnavailableError:
                if attempt + 1 < UNAVAILABLE_TRIES:
                    await asyncio.sleep(0.5)
                    continue
                raise self._died(f"its actor was unreachable {UNAVAILABLE_TRIES} times in a row") from None
            except exceptions.RayTaskError:
                raise  # a bug in the channel itself: the run's error
            except exceptions.RayError as exc:  # died, or the reply was lost with its node
                raise self._died(str(exc)) from exc
        raise AssertionError("unreachable")

    def _died(self, why: str) -> PeerGone:
        self.death, self.death_at = RuntimeError(why), time.perf_counter()
        return PeerGone(why)

    def close(self) -> None:
        if not self._closed and self.death is None:
            self._outgoing.append(_CLOSED)
            self.actor.deliver.remote(*self._batch())
        self._closed = True


class _ActorChannel:
    """The actor's end: what it sends waits in an outbox for the next ``take``; the batches of ``deliver`` and
    ``take`` calls fill its inbox in the order they were numbered (Ray may start an async actor's calls out of
    order)."""

    def __init__(self, traffic: Traffic) -> None:
        self.object_store = _Store(traffic)
        self.outbox: list[tuple[Any, ...]] = []
        self.has_mail = asyncio.Event()
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._next = 1
        self._early: dict[int, list[tuple[Any, ...]]] = {}
        self.closed = False

    def deliver(self, seq: int, messages: list[tuple[Any, ...]]) -> None:
        if not messages:
            return
        self._early[seq] = messages
        while self._next in self._early:
            for message in self._early.pop(self._next):
                self.inbox.put_nowait(message)
            self._next += 1

    async def take(self, wait_s: float, seq: int, messages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Deliver the main process's ``messages``, then return the actor's, waiting up to ``wait_s`` for one."""
        self.deliver(seq, messages)
        await asyncio.sleep(0)  # what they free (credits) may already produce messages to return
        if not self.outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.has_mail.wait(), wait_s)
        batch, self.outbox = self.outbox, []
        self.has_mail.clear()
        return batch

    def write(self, message: tuple[Any, ...], shared: Any = None) -> None:
        if self.closed:
            raise PeerGone("the main process closed the channel")
        self.outbox.append(message)
        self.has_mail.set()

    async def send(self, message: tuple[Any, ...], *, shared: Any = None) -> None:
        self.write(message)

    async def receive(self) -> tuple[tuple[Any, ...], bytes]:
        if self.closed:
            raise PeerGone("the main process closed the channel")
        message = await self.inbox.get()
        if message == _CLOSED:
            self.closed = True
            raise PeerGone("the main process closed the channel")
        return message, b""

    def close(self) -> None:
        self.closed = True


# -- the actor ---------------------------------------------------------------------------------------------------
class CollectorActor:
    """The Ray actor that runs one replica (an async actor: its calls run on one event loop, the replica's)."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        self.channel = _ActorChannel(self.traffic)
        self.task: asyncio.Task[int] | None = None

    async def start(self, label: str, modules: list[tuple[str, str, str]], spec_bytes: bytes) -> dict[str, Any]:
        """Rebuild the replica and start running it; say where it runs. A replica that cannot be rebuilt reports
        why as its error (the pipeline module failed to import here...)."""
        ray = _ray()
        from streamrl.seeding import seed_everything

        where = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                 "pid": os.getpid()}
        try:
            _import_pipeline_modules(modules)
            spec = pickle.loads(spec_bytes)
        except BaseException as exc:  # noqa: BLE001 - reported to the main process as the replica's error
            what = ", ".join(path for _, path, _ in modules) or "the pickled stages"
            text = (f"{exc} (the Ray actor of replica {label!r} failed to start while importing {what}: an actor "
                    "imports streamrl, the pipeline module and the stages' classes as the main process does; install "
                    "them on every node)")
            self.channel.write(("error", f"group {label}", type(exc).__name__, text,
                                "".join(traceback.format_exception(exc))))
            return where
        torch.set_num_threads(spec.threads)
        seed_everything(spec.seed)
        # Ray hands calls over from threads of its own: with the default 5 ms GIL switch interval a call waits up to
        # that long for the replica's busy event loop to yield the GIL; 0.5 ms keeps round trips short.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.task = asyncio.ensure_future(self._run(label, spec))
        return where

    async def _run(self, label: str, spec: Any) -> int:
        """The replica, as a worker process runs it; an error that escapes it (it then said nothing) is reported
        as the replica's, so the main process never waits on an actor that stopped working."""
        from streamrl.execution.worker import run_worker

        try:
            code: int = await run_worker(self.channel, spec)
            return code
        except BaseException as exc:
            with contextlib.suppress(PeerGone):
                self.channel.write(("error", f"group {label}", type(exc).__name__, str(exc),
                                    "".join(traceback.format_exception(exc))))
            raise

    def deliver(self, seq: int, messages: list[tuple[Any, ...]]) -> None:
        self.channel.deliver(seq, messages)

    async def take(self, wait_s: float, seq: int, messages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return await self.channel.take(wait_s, seq, messages)

    async def finished(self) -> float:
        """Wait until the replica ended; how long it waited for objects of the object store (the weights)."""
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await self.task
        return self.traffic.wait_s


def _import_pipeline_modules(modules: list[tuple[str, str, str]]) -> None:
    """Import the pipeline files the stages' classes live in: from their path when this node has it, else from
    the source the main process sent."""
    from streamrl.loader import load_module

    for name, path, source in modules:
        if name in sys.modules:
            continue
        if not Path(path).is_file():  # another machine: this node's copy of the file, one per content
            folder = Path(tempfile.gettempdir()) / "streamrl-pipelines" / hashlib.sha1(source.encode()).hexdigest()
            folder.mkdir(parents=True, exist_ok=True)
            copy = folder / Path(path).name
            copy.write_text(source)
            path = str(copy)
        load_module(path, name)


_remote_class: Any = None


def _actor_class() -> Any:
    global _remote_class
    if _remote_class is None:
        _remote_class = _ray().remote(CollectorActor)
    return _remote_class


# -- the main process's handle ----------------------------------------------------------------------------------
class RayReplica(WorkerGroup):
    """The main process's handle on one replica of a ``ray_actor`` group: starts its actor, bridges its edges,
    starts it again when it dies (up to ``max_restarts``), kills it when the run ends."""

    def __init__(self, pipeline: Pipeline, group: str, replica: int, wiring: Wiring, run: RunContext, *,
                 index: int, preload: list[tuple[str, str]], put_once: _PutOnce) -> None:
        super().__init__(pipeline, group, replica, wiring, run, index=index, preload=preload)
        self.options = pipeline.ray_options[group]
        self.put_once = put_once
        self.restarts = 0
        self.node: dict[str, Any] = {}  # where its actor runs: node_id, ip, pid
        self.nodes: list[str] = []  # the node id of every actor of this replica, in order
        self.traffic = Traffic()
        self.actor_wait_s = 0.0  # the actors' own waits for objects (the weights)
        self.actor: Any = None
        self._driver: _DriverChannel | None = None
        self._last_put: dict[str, Any] = {}  # edge -> the last item shipped to the replica (its newest weights)
        self.restart_gaps: list[float] = []  # seconds from a death to the new actor running
        self._died_at: float | None = None

    def _env_frames(self) -> dict[str, int]:
        """What this replica's env stages collected so far (their chunk events): a new actor goes on from there."""
        from streamrl.stages.env import EnvStage

        frames = {}
        for name, stage in self.pipeline.stages.items():
            if self.pipeline.stage_group[name] == self.group and isinstance(stage, EnvStage):
                label = self.pipeline.replica_label(name, self.replica)
                frames[name] = self.run_ctx.recorder.frames_by_source.get(label, 0)
        return frames

    async def run(self) -> None:
        """Run the replica's actor; when it dies, start another (fresh seeds, the frame budget left) until
        ``max_restarts``; then fail with :class:`ReplicaLost`."""
        inbound = self.inbound
        try:
            while True:
                # a restarted replica goes on with its budget, and acts with the newest weights from its first step
                spec = self._spec(restarts=self.restarts, frames=self._env_frames(), arrived=self._last_put)
                try:
                    await self._attempt(spec, {e: s.clone() for e, s in inbound.items()})
                    return
                except BaseException as exc:  # noqa: BLE001 - a death (maybe in a task group's exception group)
                    lost = first_failure(exc)
                    if not isinstance(lost, ReplicaLost):
                        raise
                    if self.run_ctx.stopping:
                        log.warning("a replica died while the run was stopping", replica=self.label,
                                    node=self.node.get("ip"))
                        return
                    if self.restarts >= self.options.max_restarts:
                        raise lost from None
                    self.restarts += 1
                    await self.run_ctx.bus.publish("replica_restarted", f"group {self.label}", {
                        "group": self.group, "replica": self.replica, "restarts": self.restarts,
                        "node": self.node.get("ip"), "node_id": self.node.get("node_id"), "cause": lost.cause})
                    log.warning("replica died; starting it again", replica=self.label, node=self.node.get("ip"),
                                restarts=self.restarts, max_restarts=self.options.max_restarts, cause=lost.cause)
        finally:
            for send in inbound.values():
                send.close()

    async def _start(self, spec: bytes) -> _DriverChannel | None:
        """Start an actor and the replica in it; None if the run stopped while Ray looked for room."""
        ray = _ray()
        resources = dict(self.options.resources)
        options: dict[str, Any] = {
            "num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0), "resources": resources,
            "max_restarts": 0, "runtime_env": {"env_vars": {"PYTHONPATH": _code_path()}},
        }
        self.actor = _actor_class().options(**options).remote()
        modules = [(name, path, Path(path).read_text()) for name, path in self.preload]
        started = self.actor.start.remote(self.label, modules, spec)
        async with anyio.create_task_group() as tg:
            async def stop_waiting_when_stopped() -> None:
                await self.run_ctx.stop_event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_waiting_when_stopped)
            with anyio.move_on_after(PLACE_TIMEOUT_S):
                try:
                    self.node = await started
                except ray.exceptions.RayActorError as exc:
                    raise self._lost(str(exc)) from exc
            tg.cancel_scope.cancel()
        if not self.node:
            if self.run_ctx.stopping:
                return None
            again = " died; started again, it" if self.restarts else ""
            raise PipelineError(
                f"replica {self.label}{again} found no room in Ray within {PLACE_TIMEOUT_S:g} s (or its actor did not "
                f"start): it asks {dict(self.options.resources)}, the cluster has {ray.available_resources()} free "
                f"of {ray.cluster_resources()}; lower the group's resources (e.g. resources={{'CPU': 0.5}}) or add "
                "nodes")
        self.nodes.append(self.node["node_id"])
        if self._died_at is not None:
            self.restart_gaps.append(round(time.perf_counter() - self._died_at, 3))
            self._died_at = None
        await self.run_ctx.bus.publish("worker_started", f"group {self.label}", {
            "group": self.group, "replica": self.replica, "pid": self.node["pid"], "node": self.node["ip"],
            "node_id": self.node["node_id"], "restarts": self.restarts})
        self._driver = _DriverChannel(self.actor, _Store(self.traffic, self.put_once, self._last_put))
        return self._driver

    def _lost(self, cause: str, at: float | None = None) -> ReplicaLost:
        """The death of this replica's actor (at ``at``, perf_counter; now if not known): a restart's gap counts
        from then."""
        self._died_at = at or time.perf_counter()
        return ReplicaLost(self.label, self.node.get("ip"), self.node.get("node_id"), self.restarts,
                           self.options.max_restarts, cause)

    async def _death(self) -> BaseException:
        death = self._driver.death if self._driver is not None else None
        return self._lost(str(death) if death is not None else "its actor stopped answering",
                          self._driver.death_at if self._driver is not None else None)

    async def _reap(self) -> None:
        """Let the actor end (ask it to cancel if it still runs), then kill it: a run leaves no actor behind."""
        ray = _ray()
        actor, channel = self.actor, self._driver
        self.actor = self._driver = None
        if actor is None:
            return
        if channel is not None and channel.death is None:
            with contextlib.suppress(PeerGone):
                if not self._finished and self._error is None:
                    channel.write(("cancel",))
                channel.close()
            deadline = self.exit_timeout if self.run_ctx.hurry_by is None else \
                max(0.0, self.run_ctx.hurry_by - anyio.current_time())
            with anyio.move_on_after(deadline), contextlib.suppress(ray.exceptions.RayError):
                self.actor_wait_s += await actor.finished.remote()
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)

    def telemetry(self) -> dict[str, Any]:
        """Where the replica ran, its restarts and what it moved (``summary.json["replicas"]``)."""
        traffic = self.traffic.as_dict()
        traffic["object_store_wait_s"] = round(self.traffic.wait_s + self.actor_wait_s, 4)
        return {"placement": "ray_actor", "node": self.node.get("ip"), "node_id": self.node.get("node_id"),
                "node_ids": self.nodes, "restarts": self.restarts, "restart_gaps_s": self.restart_gaps, **traffic}


def _code_path() -> str:
    """This process's import path without the interpreter's own folders: actors on this machine import what this
    process imports (a test module, a checkout that is not installed); on other nodes the folders may not exist and
    are skipped, and the interpreter's packages stay each node's own."""
    prefixes = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    return os.pathsep.join(p for p in sys.path if p and os.path.isdir(p) and not str(Path(p).resolve()).startswith(
        prefixes))


def ray_replicas(pipeline: Pipeline, wiring: Wiring, run: RunContext, first_index: int,
                 preload: list[tuple[str, str]]) -> list[RayReplica]:
    """The handles of every replica of the pipeline's ``ray_actor`` groups (one put of each weights version)."""
    put_once = _PutOnce()
    places = [(group, r) for group in pipeline.ray_groups() for r in range(pipeline.replicas_of(group))]
    return [RayReplica(pipeline, group, r, wiring, run, index=first_index + i, preload=preload, put_once=put_once)
            for i, (group, r) in enumerate(places)]

