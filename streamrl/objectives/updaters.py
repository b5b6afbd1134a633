"""Target-network updaters: soft (Polyak) and hard (copy every N calls).

::

    updater = SoftUpdate(loss_fn, tau=0.005)   # target <- (1 - tau) * target + tau * online
    updater = HardUpdate(loss_fn, every=500)   # target <- online, every 500th step()
    updater.step()                             # after each optimizer step
    LearnerStage(..., target_update=updater)   # in a pipeline the learner calls it after each step

``loss_fn`` is any loss exposing ``target_pairs() -> [(online, target), ...]``. ``captured`` says whether the
update is pure tensor work (``apply``) that a captured learner update may replay: a soft update is, a hard update
(a host counter decides when to copy) is not.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from streamrl.errors import ConfigError


class HasTargets(Protocol):
    def target_pairs(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]: ...


class SoftUpdate:
    """Polyak averaging of the target parameters towards the online ones at every ``step``."""

    def __init__(self, loss: HasTargets, *, tau: float = 0.005) -> None:
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"SoftUpdate: tau must be in (0, 1], got {tau}")
        self.loss = loss
        self.tau = tau
        self.steps = 0

    captured = True

    @torch.no_grad()
    def apply(self) -> None:
        """The tensor work of one step: ``target <- lerp(target, online, tau)``."""
        pairs = self.loss.target_pairs()
        torch._foreach_lerp_([t for _, t in pairs], [o.detach() for o, _ in pairs], self.tau)

    def step(self) -> None:
        self.apply()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


class HardUpdate:
    """Copy the online parameters into the target every ``every`` calls to ``step``."""

    def __init__(self, loss: HasTargets, *, every: int = 500) -> None:
        if every < 1:
            raise ConfigError(f"HardUpdate: every must be >= 1, got {every}")
        self.loss = loss
        self.every = every
        self.steps = 0

    captured = False

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            for online, target in self.loss.target_pairs():
                target.copy_(online)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
