"""The event bus: stages publish small records, hooks subscribe to them.

A stage calls ``await ctx.publish("optim_step", step=..., loss=...)``. Each subscription picks the event kinds it
wants and one of two delivery modes:

* **lockstep** — the publisher awaits the handler before it goes on. Use it when the hook must act before the
  stage continues (update a target network after each optimizer step, edit a batch before the loss sees it).
  A slow lockstep hook slows its publisher; that is the point.
* **lossy** — the event goes into a bounded buffer (drop-oldest) that the hook drains in its own task. The
  publisher never waits; when the hook falls behind, the oldest events are dropped and counted
  (``Subscription.dropped``). Use it for logging, progress bars and evaluation. Lossy hooks get the event
  without its tensor payloads (batches, chunks; one-element tensors become numbers), so a lagging hook never
  holds gigabytes of pixels: anything that needs the tensors is lockstep. When the run ends, lossy hooks get the
  events they buffered, unless a second Ctrl-C hurries it (:meth:`EventBus.drain_lossy`): those are then dropped
  and counted too.

A hook is any object with ``name``, ``events`` (kinds, or ``("*",)`` for all), ``mode`` and ``on_event(event)``
(sync or async); optional ``start(run)`` and ``close(run)`` open and flush its resources::

    class PrintLoss(Hook):
        events = ("optim_step",)
        mode = "lossy"
        def on_event(self, event):
            print(event.data["loss"])

Publishing an event nobody subscribed to costs a dictionary lookup; publishers that build expensive payloads
check :meth:`EventBus.wants` first.
"""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio
import torch
from tensordict import TensorDictBase

from streamrl.errors import ConfigError, EndOfStream, StageFailed
from streamrl.streams import ReceiveStream, SendStream, open_stream

if TYPE_CHECKING:
    from streamrl.execution.context import RunContext

Mode = Literal["lockstep", "lossy"]
Handler = Callable[["Event"], Awaitable[None] | None]


@dataclass(slots=True)
class Event:
    """One published record: its ``kind``, the stage or hook that published it, seconds since the run started."""

    kind: str
    source: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def without_tensors(self) -> Event:
        """The event without tensor payloads (one-element tensors become numbers): what lossy hooks buffer and
        what crosses to another process, so that a lagging hook never pins batches or chunks in memory."""
        data = {}
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 1:
                    data[key] = value.item()
            elif not isinstance(value, TensorDictBase):
                data[key] = value
        return Event(self.kind, self.source, self.time, data)


class Hook(ABC):
    """Base class of hooks: a named subscriber with optional start/close.

    Subclasses set ``events`` and ``mode`` and implement ``on_event``. ``start`` runs before the first stage
    starts; ``close`` runs on every exit path (normal end, Ctrl-C, a failed stage) and must flush.

    A hook runs in the process of the group it is added to, and acts on the objects it holds there: the pipeline
    refuses a hook whose modules (or replay buffers) only stages of another process hold, and a ``main_only`` hook
    (one that reads ``run.recorder`` or ``run.pipeline``, which only the main process has) in a worker group.
    """

    events: ClassVar[tuple[str, ...]] = ()
    mode: ClassVar[Mode] = "lockstep"
    capacity: ClassVar[int] = 256  # buffer of a lossy subscription
    main_only: ClassVar[bool] = False  # True: it needs the main process (the run's recorder, pipeline, files)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__

    async def start(self, run: RunContext) -> None:
        """Open files, build eval envs: anything that needs the run directory."""

    @abstractmethod
    def on_event(self, event: Event) -> Awaitable[None] | None:
        """Handle one event (sync or async)."""

    async def close(self, run: RunContext) -> None:
        """Flush and release; called once on every exit path."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this hook (hooks in the main process only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes."""


class FunctionHook(Hook):
    """A hook made of one callable, for ``Pipeline.on(kind, fn)``."""

    def __init__(self, handler: Handler, kinds: str | Iterable[str], *, mode: Mode = "lockstep",
                 name: str | None = None) -> None:
        super().__init__(name or getattr(handler, "__qualname__", "function"))
        self.handler = handler
        self.events = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # type: ignore[misc]
        self.mode = mode  # type: ignore[misc]

    def on_event(self, event: Event) -> Awaitable[None] | None:
        return self.handler(event)


class Subscription:
    """A handler attached to some event kinds; lossy subscriptions own a bounded drop-oldest stream."""

    def __init__(self, name: str, handler: Handler, kinds: frozenset[str] | None, mode: Mode, capacity: int):
        if mode not in ("lockstep", "lossy"):
            raise ConfigError(f"subscription {name!r}: mode must be 'lockstep' or 'lossy', got {mode!r}")
        self.name = name
        self.handler = handler
        self.kinds = kinds
        self.mode = mode
        self.is_async = inspect.iscoroutinefunction(handler)
        self.excluded: frozenset[str] = frozenset()  # kinds a "*" subscription leaves out
        self.delivered = 0
        self.abandoned = 0  # events a lossy subscription still buffered when its drain was cancelled
        self._send: SendStream[Event] | None = None
        self._receive: ReceiveStream[Event] | None = None
        if mode == "lossy":
            self._send, self._receive = open_stream(capacity, name=f"hook:{name}", overflow="drop_oldest")

    @property
    def dropped(self) -> int:
        """Events this lossy subscription never handed to its hook: dropped when its buffer was full, or still
        buffered when its drain was cancelled."""
        return self._send.statistics().dropped + self.abandoned if self._send is not None else 0

    async def deliver(self, event: Event) -> None:
        if self._send is not None:
            if not self._send.closed:
                self._send.send_nowait(event.without_tensors())
            return
        self.delivered += 1
        try:
            result = self.handler(event)
            if self.is_async or inspect.isawaitable(result):
                await result  # type: ignore[misc]
        except StageFailed:
            raise
        except Exception as exc:
            raise StageFailed(f"hook {self.name}", exc) from exc

    async def drain(self) -> None:
        """Run a lossy subscription: hand buffered events to the handler until the bus closes.

        Cancelled, it stops at once (an async handler is cancelled where it awaits); the events it still buffered
        are dropped and counted in :attr:`dropped`.
        """
        receive = self._receive
        assert receive is not None, "only lossy subscriptions are drained"
        try:
            while True:
                try:
                    event = await receive.receive()
                except EndOfStream:
                    return
                self.delivered += 1
                try:
                    result = self.handler(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    raise StageFailed(f"hook {self.name}", exc) from exc
        except anyio.get_cancelled_exc_class():
            self.abandoned += receive.statistics().depth
            receive.close()
            raise

    def close(self) -> None:
        if self._send is not None:
            self._send.close()


class EventBus:
    """Routes published events to subscriptions by kind."""

    def __init__(self, clock_start: float | None = None, *, logical: bool = False) -> None:
        self.start = time.perf_counter() if clock_start is None else clock_start
        self.logical = logical  # deterministic runs: time counts published events (1 ms each), not seconds
        self.ticks = 0
        self.subscriptions: list[Subscription] = []
        self._by_kind: dict[str, list[Subscription]] = {}
        self._wildcard: list[Subscription] = []

    def subscribe(
        self,
        handler: Handler,
        kinds: Iterable[str] | None = None,
        *,
        mode: Mode = "lockstep",
        capacity: int = 256,
        name: str | None = None,
    ) -> Subscription:
        """Attach ``handler`` to ``kinds`` (None or ``"*"`` = every kind; ``"-kind"`` leaves one out of ``"*"``)."""
        kinds = ("*",) if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
        wanted = [k for k in kinds if not k.startswith("-")]
        kind_set = None if "*" in wanted else frozenset(wanted)
        sub = Subscription(name or str(getattr(handler, "__qualname__", "handler")), handler, kind_set, mode, capacity)
        sub.excluded = frozenset(k[1:] for k in kinds if k.startswith("-"))
        self.subscriptions.append(sub)
        if kind_set is None:
            self._wildcard.append(sub)
            for kind, subs in self._by_kind.items():
                if kind not in sub.excluded:
                    subs.append(sub)
        else:
            for kind in kind_set:
                self._subscribers(kind).append(sub)
        return sub

    def _subscribers(self, kind: str) -> list[Subscription]:
        subs = self._by_kind.get(kind)
        if subs is None:
            subs = self._by_kind[kind] = [w for w in self._wildcard if kind not in w.excluded]
        return subs

    def add_hook(self, hook: Hook) -> Subscription:
        return self.subscribe(hook.on_event, hook.events, mode=hook.mode, capacity=hook.capacity, name=hook.name)

    def wants(self, kind: str) -> bool:
        """True when someone listens to ``kind``: publishers skip building payloads nobody reads."""
        return bool(self._subscribers(kind))

    def now(self) -> float:
        return self.ticks / 1000 if self.logical else time.perf_counter() - self.start

    async def publish(self, kind: str, source: str, data: dict[str, Any]) -> None:
        subs = self._subscribers(kind)
        if not subs:
            return
        self.ticks += 1
        event = Event(kind, source, self.now(), data)
        for sub in subs:
            await sub.deliver(event)

    async def forward(self, event: Event) -> None:
        """Deliver an event that was published elsewhere (a worker process), keeping its source and time."""
        for sub in self._subscribers(event.kind):
            await sub.deliver(event)

    def lossy(self) -> list[Subscription]:
        return [s for s in self.subscriptions if s.mode == "lossy"]

    async def drain_lossy(self, hurry: anyio.Event) -> None:
        """Run every lossy subscription until the bus closes and each has handed its buffered events to its hook.

        Once ``hurry`` is set (a second Ctrl-C), stop at once, however slow a hook is: what is still buffered is
        dropped and counted (:attr:`Subscription.dropped`).
        """
        async with anyio.create_task_group() as tg:

            async def stop_when_hurried() -> None:
                await hurry.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_hurried)
            async with anyio.create_task_group() as drains:
                for sub in self.lossy():
                    drains.start_soon(sub.drain)
            tg.cancel_scope.cancel()  # every subscription drained: nothing to hurry

    def close(self) -> None:
        """End every lossy subscription's stream: their drain tasks finish after the buffered events."""
        for sub in self.subscriptions:
            sub.close()

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {s.name: {"mode": s.mode, "delivered": s.delivered, "dropped": s.dropped} for s in self.subscriptions}
