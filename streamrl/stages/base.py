"""The stage interface: an async component with named input and output ports.

A stage owns its state and talks to the world only through its ports (bounded streams) and the event bus::

    class Doubler(Stage):
        inputs = ("numbers",)
        outputs = ("doubled",)

        async def run(self, ctx: StageContext) -> None:
            async for x in ctx.input("numbers"):          # ends when the upstream stage closes
                await ctx.output("doubled").send(2 * x)   # waits while downstream is busy
                await ctx.publish("doubled", value=2 * x) # hooks subscribed to "doubled" see it

The runtime closes a stage's outputs when ``run`` returns (downstream then sees the end of the stream) and calls
``close`` on every exit path: flush files there. A *source* stage (``source = True``) produces data on its own
and must return soon after ``ctx.stopping`` becomes true; the rest of the pipeline then drains.

A stage that computes gradients sets ``needs_grad = True`` (the learner does). A process none of whose stages does
(a collector worker, a collection-only pipeline) runs all of its stages and hooks in ``torch.inference_mode()``:
every torch op skips autograd bookkeeping, which is a sizeable share of a small policy's forward. Tensors created
there are inference tensors; replay storages allocate theirs as normal tensors, and anything else that should be
trained on after the run needs a ``.clone()`` outside inference mode.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from streamrl.errors import PipelineError
from streamrl.exchange import Asker, Server
from streamrl.streams import ReceiveStream, SendStream

if TYPE_CHECKING:
    import torch

    from streamrl.execution.context import RunContext


class Stage(ABC):
    """Base class of stages. Subclasses declare ``inputs``/``outputs`` and implement ``run``."""

    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[frozenset[str]] = frozenset()  # ports that may stay unconnected
    exchanges: ClassVar[frozenset[str]] = frozenset()  # ports that are request/answer exchanges, not streams
    source: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False  # True for stages that train; see the module docstring

    def __init__(self, name: str) -> None:
        if not name or not isinstance(name, str) or "." in name:
            raise PipelineError(f"a stage name must be a non-empty string without '.', got {name!r}")
        self.name = name

    @abstractmethod
    async def run(self, ctx: StageContext) -> None:
        """The stage's work: receive from inputs, send to outputs, until the inputs end or a stop."""

    async def close(self, ctx: StageContext) -> None:
        """Release resources; called once on every exit path, after ``run`` ended or was cancelled."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # -- links the graph checks (streamrl.graph_checks), by object identity, before anything is pickled ---------
    def shares(self) -> tuple[object, ...]:
        """Objects this stage uses by reference together with other stages (a replay writer and its sampler share
        the buffer): stages sharing an object must run in one process. Default: none."""
        return ()

    def trains(self) -> tuple[torch.Tensor, ...]:
        """The parameters this stage updates (a learner: its optimizer's). Default: none."""
        return ()

    def publishes(self) -> torch.nn.Module | None:
        """The module whose weights this stage sends on its ``weights`` output (a learner's ``publish``)."""
        return None

    def acts_with(self) -> torch.nn.Module | None:
        """The module this stage acts with, whose new weights it takes from its ``weights`` input (a policy)."""
        return None

    @contextlib.asynccontextmanager
    async def held_for_checkpoint(self) -> AsyncIterator[None]:
        """Hold the stage still while a checkpoint reads its ``state_dict``: durable first, then unchanged.

        The ``Checkpoint`` hook enters this for every stage of the main process before it reads their states
        and leaves it after. A stage with data on its way to disk overrides it: a replay writer commits its
        store's pending rows and inserts nothing until the checkpoint has its state, so a checkpoint never counts
        a row the store does not hold.
        """
        yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class StageContext:
    """What a running stage sees: its connected ports, the run, and the event bus."""

    def __init__(
        self,
        stage: Stage,
        run: RunContext,
        inputs: Mapping[str, ReceiveStream[Any] | Server[Any, Any]],
        outputs: Mapping[str, SendStream[Any] | Asker[Any, Any]],
        *,
        label: str | None = None,
    ) -> None:
        self.stage = stage
        self.name = label or stage.name  # what events, statistics and errors call it: "env[2]" in replica 2
        self.run = run
        self._inputs = inputs
        self._outputs = outputs
        self.extra_wait_s = 0.0  # waits outside streams (rate limiter, sleeps) the stage reports
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def input(self, port: str) -> ReceiveStream[Any]:
        return self._port(self._inputs, port, "input", ReceiveStream)  # type: ignore[no-any-return]

    def output(self, port: str) -> SendStream[Any]:
        return self._port(self._outputs, port, "output", SendStream)  # type: ignore[no-any-return]

    def server(self, port: str) -> Server[Any, Any]:
        """The server half of an exchange input (one of the stage's ``exchanges``): see :mod:`streamrl.exchange`."""
        return self._port(self._inputs, port, "input", Server)  # type: ignore[no-any-return]

    def asker(self, port: str) -> Asker[Any, Any]:
        """The asker half of an exchange output (one of the stage's ``exchanges``): see :mod:`streamrl.exchange`."""
        return self._port(self._outputs, port, "output", Asker)  # type: ignore[no-any-return]

    def _port(self, ports: Mapping[str, Any], port: str, kind: str, expected: type) -> Any:
        try:
            half = ports[port]
        except KeyError:
            raise PipelineError(
                f"stage {self.name!r} has no connected {kind} {port!r}; connected: {sorted(ports)}"
            ) from None
        if not isinstance(half, expected):
            method = "server" if isinstance(half, Server) else "asker" if isinstance(half, Asker) else kind
            raise PipelineError(f"{kind} {port!r} of stage {self.name!r} is a {type(half).__name__}, not a "
                                f"{expected.__name__}; use ctx.{method}({port!r})")
        return half

    def has_input(self, port: str) -> bool:
        return port in self._inputs

    def has_output(self, port: str) -> bool:
        return port in self._outputs

    @property
    def stopping(self) -> bool:
        """True once a stop was requested (Ctrl-C, a solved evaluation): sources should return."""
        return self.run.stopping

    async def publish(self, kind: str, **data: Any) -> None:
        await self.run.bus.publish(kind, self.name, data)

    def wants(self, kind: str) -> bool:
        return self.run.bus.wants(kind)

    def close_ports(self) -> None:
        for out in self._outputs.values():
            out.close()
        for inp in self._inputs.values():
            inp.close()

    def busy_fraction(self) -> float:
        """Share of the stage's lifetime not spent waiting on its streams or rate limits."""
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else time.perf_counter()
        wall = max(end - self.started_at, 1e-9)
        waited = self.extra_wait_s + sum(s.waited_s for s in self._inputs.values())
        waited += sum(s.waited_s for s in self._outputs.values())
        return max(0.0, min(1.0, 1.0 - waited / wall))
