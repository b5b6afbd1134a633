"""Schedule hooks: target-network updates and epsilon annealing, driven by events.

::

    pipeline.add_hook(TargetNetworkUpdate(SoftUpdate(loss_fn, tau=0.01)))       # after every optimizer step
    pipeline.add_hook(EpsilonAnnealing(explore), group="collect")               # where the policy runs

Both are lockstep: the publishing stage waits for them, so the target network is updated before the next loss
and epsilon before the next chunk. Place each hook in the group of the module it changes.
"""

from __future__ import annotations

from typing import Any

from streamrl.events import Event, Hook
from streamrl.modules.exploration import EGreedyModule
from streamrl.objectives.updaters import HardUpdate, SoftUpdate


class TargetNetworkUpdate(Hook):
    """Calls ``updater.step()`` after each optimizer step (TorchRL's ``post_optim`` hook point)."""

    events = ("optim_step",)
    mode = "lockstep"

    def __init__(self, updater: SoftUpdate | HardUpdate, name: str | None = None) -> None:
        super().__init__(name)
        self.updater = updater

    def on_event(self, event: Event) -> None:
        self.updater.step()

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()


class EpsilonAnnealing(Hook):
    """Advances an :class:`EGreedyModule`'s schedule by the frames of each chunk (``post_steps``)."""

    events = ("chunk",)
    mode = "lockstep"

    def __init__(self, module: EGreedyModule, name: str | None = None) -> None:
        super().__init__(name)
        self.module = module

    def on_event(self, event: Event) -> None:
        self.module.step(event.data["chunk_frames"])
