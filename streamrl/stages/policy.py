"""The policy stage: batched inference for env stages, with versioned weights.

Env stages ask it for actions through a request/answer exchange (:mod:`streamrl.exchange`): each step an env stage
asks a :class:`PolicyRequest` (a TensorDict holding the current ``observation`` of its envs, and whether the step
starts a chunk) and gets back a :class:`PolicyAnswer` (the same TensorDict with the policy's outputs, ``action``,
..., written in, and the version of the weights that acted)::

    policy = PolicyStage("policy", explore_policy, weights_module=actor)
    pipeline.connect("env.policy", "policy.requests", capacity=0)   # a rendezvous hand-off
    pipeline.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")

With ``capacity=0`` and both stages in one process, the env stage calls the policy's handler itself: no trip
through the scheduler, and the policy's work is still timed and counted as this stage's (its busy fraction).
``capacity>=1`` queues requests for the policy's own task instead. Several env stages may ask one policy (connect
each to ``policy.requests``): with two env stages double buffering, one steps its envs while the other waits for
inference, which pays off when envs step in subprocesses or inference runs on a GPU.

Weights arrive on the optional ``weights`` input as TensorDicts ``{"params": ..., "version": ...}`` published by
the learner. They are applied only at the first step of a chunk (``PolicyRequest.new_chunk``), so every
transition of a chunk was produced by one known ``policy_version``.

On-policy learning bounds how stale the acting weights may be. It takes a learner that publishes once per chunk
it trained on (``LearnerStage(schedule=Epochs(...))``): weights of version ``v0 + j`` (``v0``: the version at the start)
have learnt from ``j`` chunks. With ``max_policy_lag=k`` the stage starts its ``i``-th chunk only with weights of
version ``>= v0 + i - k``, waiting for the learner if needed (the answer is then an awaitable the asking env stage
awaits); the learner then trains on it at most ``k`` versions later. ``0`` is strictly on-policy (collect, learn,
collect, ...); ``1`` collects the next chunk while the learner trains on the last one.

The stage acts with its *own copy* of the policy's parameters (gradients off), even in the learner's process: the
learner's updates reach it only as published, versioned weights. Modules without parameters (exploration
schedules such as ``EGreedyModule``) are not copied, so hooks that drive them keep working.

At each chunk's first step the stage publishes an ``explore`` event with the ``scalars()`` of the policy's modules
that report some (:class:`~streamrl.modules.exploration.ReportsScalars`: ``epsilon``, ``sigma``), as plain floats,
so that the ``Logger`` sees them wherever the policy runs; only when the policy has such a module and some hook
listens.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase

from streamrl.errors import BrokenStreamError, ConfigError, EndOfStream
from streamrl.exchange import Server
from streamrl.modules.actors import QValueActor
from streamrl.modules.exploration import ReportsScalars
from streamrl.stages.base import Stage, StageContext
from streamrl.streams import ReceiveStream


@dataclass(slots=True)
class PolicyRequest:
    """An env stage's request: its envs' current observations (``td``), and whether this step starts a chunk
    (``new_chunk``: the only steps at which the policy takes new weights). One per step; the ``td`` may be the
    env stage's own, reused from step to step.

    ``action_only``: the asker reads nothing but :attr:`PolicyAnswer.action` (the env stage's numpy path, recording
    only the action). The policy may then act on the observation tensor alone (:func:`action_function`) and leave
    ``td`` as it was; it reads ``td["observation"]`` once per chunk and per ``td``, so such an asker updates that
    tensor in place within a chunk rather than replacing it."""

    td: TensorDictBase
    new_chunk: bool = False
    action_only: bool = False


@dataclass(slots=True)
class PolicyAnswer:
    """The policy's answer: ``td`` is the request's ``td`` with the policy's outputs (``action``, ...) written in
    (the same object; on an accelerator the outputs are copied back into it; unchanged for an ``action_only``
    request the policy answered on its tensor fast path), ``version`` the version of the weights that acted,
    ``action`` the action (a CPU tensor, ``td["action"]`` when written there)."""

    td: TensorDictBase
    version: int
    action: torch.Tensor


def action_function(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The action as a function of the observation tensor alone, skipping TensorDicts, where the module allows it;
    None where it does not (then the policy runs the keyed module on the request's TensorDict).

    A :class:`~streamrl.modules.actors.QValueActor` reading ``observation`` and writing index actions (no one-hot,
    no dtype cast), without hooks, acts as ``value_net(observation).argmax(-1)``: the same action (the first
    maximum on ties), without the keyed module's reads and writes. Its other outputs (``action_value``,
    ``chosen_action_value``) are not computed, which is why only ``action_only`` requests take this path.
    """
    if (type(module) is QValueActor and module.in_keys == ["observation"] and not module.one_hot
            and module.action_dtype is None and not module._forward_hooks and not module._forward_pre_hooks):
        net = module.value_net
        return lambda observation: net(observation).argmax(-1)
    return None


def weights_message(module: torch.nn.Module, version: int) -> TensorDict:
    """The weights of ``module`` as a detached CPU TensorDict tagged with ``version``."""
    params = TensorDict.from_module(module).data.to("cpu", non_blocking=False).clone()
    return TensorDict({"params": params, "version": torch.tensor(version, dtype=torch.int64)}, batch_size=[])


class PolicyStage(Stage):
    """Answers env stages' requests with ``policy`` (a TensorDict module); see the module docstring."""

    inputs = ("requests", "weights")
    optional = frozenset({"weights"})
    exchanges = frozenset({"requests"})

    def __init__(
        self,
        name: str,
        policy: TensorDictModuleBase,
        *,
        weights_module: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        max_policy_lag: int | None = None,
    ) -> None:
        super().__init__(name)
        if max_policy_lag is not None and max_policy_lag < 0:
            raise ConfigError(f"PolicyStage {name!r}: max_policy_lag must be >= 0 (or None), got {max_policy_lag}")
        self.max_policy_lag = max_policy_lag
        self.policy = policy
        self.weights_module = weights_module if weights_module is not None else policy
        self.device = torch.device(device)
        self.version = 0
        # set by run(): the weights input, the exchange, and the count max_policy_lag works from
        self._weights: ReceiveStream[Any] | None = None
        self._server: Server[PolicyRequest, PolicyAnswer] | None = None
        self._first_version = 0
        self._chunks = 0
        self._fast: Callable[[torch.Tensor], torch.Tensor] | None = None  # action_function(acting), on CPU
        self._fast_td: TensorDictBase | None = None  # the td whose observation is cached (per chunk)
        self._fast_observation: torch.Tensor | None = None
        self._ctx: StageContext | None = None  # set by run(): where the explore event is published
        self._reporters: list[ReportsScalars] = []  # the acting policy's modules with scalars()

    def acts_with(self) -> torch.nn.Module:
        return self.policy

    def _own_copy(self) -> None:
        """Copy the modules holding parameters (not the parameter-free ones); switch their gradients off."""
        shared = {id(m): m for m in self.policy.modules() if not any(True for _ in m.parameters())}
        memo: dict[int, Any] = dict(shared)
        self.acting = copy.deepcopy(self.policy, memo)
        self.acting.requires_grad_(False)
        self.acting_weights = memo.get(id(self.weights_module), self.acting)

    def load_weights(self, message: TensorDictBase) -> None:
        target = TensorDict.from_module(self.acting_weights)
        with torch.no_grad():
            target.update_(message["params"])
        self.version = int(message["version"])

    async def run(self, ctx: StageContext) -> None:
        self._own_copy()
        self.acting.to(self.device)
        self._fast = action_function(self.acting) if self.device.type == "cpu" else None
        self._weights = ctx.input("weights") if ctx.has_input("weights") else None
        self._first_version, self._chunks = self.version, 0  # the max_policy_lag rule counts from here
        self._ctx = ctx
        self._reporters = [m for m in self.acting.modules() if isinstance(m, ReportsScalars)]
        self._server = ctx.server("requests")
        await self._server.serve(self.answer, stage=ctx.name)  # until every env stage is done asking

    def answer(self, request: PolicyRequest) -> PolicyAnswer | Awaitable[PolicyAnswer]:
        """The exchange's handler: act on ``request``; at a chunk's first step take the newest weights first (an
        awaitable answer when ``max_policy_lag`` makes it wait for the learner)."""
        if request.new_chunk:
            weights = self._weights
            if weights is not None:
                message = weights.latest_nowait()
                if message is not None:
                    self.load_weights(message)
                if self.max_policy_lag is not None and self.version < self._needed_version():
                    return self._answer_after_weights(request)
            self._chunks += 1
            if self._announces():
                return self._announce_and_act(request)
        return self._act(request)

    def _announces(self) -> bool:
        """Whether chunk starts publish an ``explore`` event: a module reports scalars and a hook listens."""
        return bool(self._reporters) and self._ctx is not None and self._ctx.wants("explore")

    async def _announce(self) -> None:
        """Publish the ``explore`` event: the reporting modules' scalars (plain floats)."""
        assert self._ctx is not None
        scalars: dict[str, float] = {}
        for module in self._reporters:
            scalars.update(module.scalars())
        await self._ctx.publish("explore", **scalars)

    async def _announce_and_act(self, request: PolicyRequest) -> PolicyAnswer:
        await self._announce()
        return self._act(request)

    def _needed_version(self) -> int:
        """The oldest weights the next chunk may start with under ``max_policy_lag``."""
        assert self.max_policy_lag is not None
        return self._first_version + self._chunks - self.max_policy_lag

    async def _answer_after_weights(self, request: PolicyRequest) -> PolicyAnswer:
        """Wait for the learner's weights until the chunk may start (``max_policy_lag``), then act."""
        weights, server = self._weights, self._server
        assert weights is not None and server is not None
        while self.version < self._needed_version():
            try:
                self.load_weights(await weights.receive())
            except EndOfStream:  # the learner ended: no weights will come, collection ends
                server.close()
                raise BrokenStreamError(f"policy stage {self.name!r}: the learner's weights ended while the next "
                                        f"chunk waited for version {self._needed_version()}") from None
        self._chunks += 1
        if self._announces():
            await self._announce()
        return self._act(request)

    def _act(self, request: PolicyRequest) -> PolicyAnswer:
        """Act on the request (no autograd graph: the acting copy needs no gradient): on the observation tensor
        alone where allowed (see :class:`PolicyRequest`), else by writing the policy's outputs into its ``td``."""
        td = request.td
        fast = self._fast
        if fast is not None and request.action_only:
            if request.new_chunk or td is not self._fast_td:  # read the observation once per chunk and td
                self._fast_td, self._fast_observation = td, td.get("observation")
            return PolicyAnswer(td, self.version, fast(self._fast_observation))  # type: ignore[arg-type]
        if self.device.type == "cpu":
            self.acting(td)
        else:
            out = self.acting(td.to(self.device, non_blocking=True))
            td.update(out.select(*self.acting.out_keys).to("cpu"))
        return PolicyAnswer(td, self.version, td.get("action"))

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The version of the weights it will act with (a resumed learner's: the actor was restored with it)."""
        self.version = state["version"]
