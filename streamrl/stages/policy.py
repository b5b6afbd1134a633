"""The policy stage: batched inference for env stages, with versioned weights.

Env stages send a :class:`StepRequest` (a TensorDict holding the current ``observation`` of their envs) on the
``requests`` stream; the policy module writes its outputs (``action``, ...) into that same TensorDict and sends
the request back on ``actions`` (``actions1`` for the second env group when ``groups=2``). Requests are reused
from step to step, so the hot path allocates nothing but the module's outputs::

    policy = PolicyStage("policy", explore_policy, weights_module=actor)
    pipeline.connect("env.requests", "policy.requests", capacity=1)
    pipeline.connect("policy.actions", "env.actions", capacity=1)
    pipeline.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")

Weights arrive on the optional ``weights`` input as TensorDicts ``{"params": ..., "version": ...}`` published by
the learner. They are applied only at the first step of a chunk (``StepRequest.new_chunk``), so every transition
of a chunk was produced by one known ``policy_version``.

On-policy learning bounds how stale the acting weights may be. It takes a learner that publishes once per chunk
it trained on (``LearnerStage(epochs=...)``): weights of version ``v0 + j`` (``v0``: the version at the start)
have learnt from ``j`` chunks. With ``max_policy_lag=k`` the stage starts its ``i``-th chunk only with weights of
version ``>= v0 + i - k``, waiting for the learner if needed; the learner then trains on it at most ``k``
versions later. ``0`` is strictly on-policy (collect, learn, collect, ...); ``1`` collects the next chunk while
the learner trains on the last one.

The stage acts with its *own copy* of the policy's parameters (gradients off), even in the learner's process: the
learner's updates reach it only as published, versioned weights. Modules without parameters (exploration
schedules such as ``EGreedyModule``) are not copied, so hooks that drive them keep working.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase

from streamrl.errors import ConfigError, EndOfStream, WouldBlock
from streamrl.stages.base import Stage, StageContext


class StepRequest:
    """A reusable request: an env group's current observations, and the policy's answer written back in."""

    __slots__ = ("group", "new_chunk", "td", "version")

    def __init__(self, td: TensorDictBase, group: int = 0) -> None:
        self.td = td
        self.group = group
        self.new_chunk = True
        self.version = 0


def weights_message(module: torch.nn.Module, version: int) -> TensorDict:
    """The weights of ``module`` as a detached CPU TensorDict tagged with ``version``."""
    params = TensorDict.from_module(module).data.to("cpu", non_blocking=False).clone()
    return TensorDict({"params": params, "version": torch.tensor(version, dtype=torch.int64)}, batch_size=[])


class PolicyStage(Stage):
    """Runs ``policy`` (a TensorDict module) on each request; see the module docstring."""

    inputs = ("requests", "weights")
    optional = frozenset({"weights"})

    def __init__(
        self,
        name: str,
        policy: TensorDictModuleBase,
        *,
        weights_module: torch.nn.Module | None = None,
        groups: int = 1,
        device: str | torch.device = "cpu",
        max_policy_lag: int | None = None,
    ) -> None:
        super().__init__(name)
        if max_policy_lag is not None and max_policy_lag < 0:
            raise ConfigError(f"PolicyStage {name!r}: max_policy_lag must be >= 0 (or None), got {max_policy_lag}")
        self.max_policy_lag = max_policy_lag
        if groups not in (1, 2):
            raise ConfigError(f"PolicyStage {name!r}: groups must be 1 or 2, got {groups}")
        self.policy = policy
        self.weights_module = weights_module if weights_module is not None else policy
        self.groups = groups
        self.outputs = ("actions",) if groups == 1 else ("actions", "actions1")  # type: ignore[misc]
        self.device = torch.device(device)
        self.version = 0

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
        requests = ctx.input("requests")
        weights = ctx.input("weights") if ctx.has_input("weights") else None
        outs = [ctx.output(port) for port in self.outputs]
        policy = self.acting
        on_cpu = self.device.type == "cpu"
        first_version, chunks = self.version, 0  # the max_policy_lag rule counts from here
        while True:
            try:
                request: StepRequest = await requests.receive()
            except EndOfStream:
                return
            if request.new_chunk:
                if weights is not None:
                    message = weights.latest_nowait()
                    if message is not None:
                        self.load_weights(message)
                    if self.max_policy_lag is not None:
                        while self.version < first_version + chunks - self.max_policy_lag:  # wait for the learner
                            try:
                                self.load_weights(await weights.receive())
                            except EndOfStream:
                                return
                chunks += 1
                request.version = self.version
            if on_cpu:
                policy(request.td)  # no autograd graph: the acting copy's parameters need no gradient
            else:
                out = policy(request.td.to(self.device, non_blocking=True))
                request.td.update(out.select(*policy.out_keys).to("cpu"))
            answer = outs[request.group]
            try:
                answer.send_nowait(request)  # the env stage waits for exactly this answer: there is room
            except WouldBlock:
                await answer.send(request)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The version of the weights it will act with (a resumed learner's: the actor was restored with it)."""
        self.version = state["version"]
