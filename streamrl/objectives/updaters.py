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

import warnings
from typing import Any, Protocol

import torch

from streamrl.errors import ConfigError, torchrl_names


class HasTargets(Protocol):
    def target_pairs(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]: ...


def _eps_message(eps: Any) -> str:
    tau = f"{1.0 - eps:.6g}" if isinstance(eps, (int, float)) else "1 - eps"
    return (f"SoftUpdate takes tau, the weight of the online network; TorchRL's eps={eps} (the weight of the "
            f"target) is tau={tau}: SoftUpdate(loss, tau={tau})")


class SoftUpdate:
    """Polyak averaging of the target parameters towards the online ones at every ``step``.

    ``tau`` is the weight of the *online* network: ``target <- (1 - tau) * target + tau * online``; small values
    (0.001 to 0.05) make a slowly moving target. TorchRL's ``eps`` is the weight of the target, ``tau = 1 - eps``
    (``SoftUpdate(loss, eps=0.995)`` there is ``SoftUpdate(loss, tau=0.005)`` here); passing ``eps`` is a
    ``TypeError`` that says so, and a ``tau`` above 0.5 warns, as it is most likely an ``eps``.
    """

    @torchrl_names("SoftUpdate", convert={"eps": _eps_message})
    def __init__(self, loss: HasTargets, *, tau: float = 0.005) -> None:
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"SoftUpdate: tau must be in (0, 1], got {tau}")
        if tau > 0.5:
            warnings.warn(f"SoftUpdate: tau={tau} moves the target network {tau * 100:.3g}% of the way to the "
                          f"online one at every step; tau is the weight of the online network (TorchRL's eps is the "
                          f"target's: eps={tau} there is tau={1.0 - tau:.6g} here)", UserWarning, stacklevel=3)
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
    """Copy the online parameters into the target every ``every`` calls to ``step``.

    TorchRL's ``value_network_update_interval`` is accepted as ``every``.
    """

    @torchrl_names("HardUpdate", accept={"value_network_update_interval": "every"})
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
