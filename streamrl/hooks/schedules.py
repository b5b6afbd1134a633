"""Schedule hooks: exploration annealing, driven by events.

::

    pipeline.add_hook(EpsilonAnnealing(explore), group="collect")               # where the policy runs

Target networks are not a hook: the learner updates them after each optimizer step
(``LearnerStage(..., target_update=SoftUpdate(loss, tau=0.005))``), inside a captured update when it can.

``EpsilonAnnealing`` drives any module with a ``step(frames)`` method: ``EGreedyModule``'s epsilon,
``AdditiveGaussianModule``'s and ``OrnsteinUhlenbeckModule``'s sigma.

It is lockstep: the env stage waits for it, so epsilon changes before the next chunk. Place it in the group of the
module it changes.
"""

from __future__ import annotations

from typing import Protocol

from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext


class Annealed(Protocol):
    """A schedule advanced by env frames (the exploration modules)."""

    def step(self, frames: int = 1) -> None: ...


class EpsilonAnnealing(Hook):
    """Advances an exploration schedule (``module.step(frames)``) by the frames collected (``post_steps``).

    It follows each collecting stage's frame count, not the chunks it saw, so a resumed run (whose env stages
    start from the checkpoint's frames) picks the schedule up where it was. In a replicated group each replica
    anneals its own copy by its frames times the number of replicas: the run's frames, when the replicas collect
    at one pace, so ``annealing_frames`` keeps counting the run's frames.
    """

    events = ("chunk",)
    mode = "lockstep"

    def __init__(self, module: Annealed, name: str | None = None) -> None:
        super().__init__(name)
        self.module = module
        self.frames_by_source: dict[str, int] = {}
        self.replicas = 1

    async def start(self, run: RunContext) -> None:
        self.replicas = run.pipeline.replicas_of(run.process)

    def on_event(self, event: Event) -> None:
        frames = event.data["frames"]
        self.module.step((frames - self.frames_by_source.get(event.source, 0)) * self.replicas)
        self.frames_by_source[event.source] = frames
