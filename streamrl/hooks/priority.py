"""The priority hook: after each loss, the learner's TD errors become the sampled rows' replay priorities.

::

    replay = ReplayBuffer(RamStorage(100_000), sampler=PrioritizedSampler(alpha=0.6, beta=0.4))
    pipeline.add_hook(PriorityUpdate(replay))           # main process, next to the learner and the buffer

The learner publishes ``loss`` events with the batch (whose ``index`` names the rows) and the loss output. The
hook is lockstep: it sees every loss, before the learner takes its optimizer step and samples again.
"""

from __future__ import annotations

from streamrl.events import Event, Hook
from streamrl.replay.buffer import ReplayBuffer


class PriorityUpdate(Hook):
    """Calls ``buffer.sampler.update_priority(batch["index"], loss_out[key])`` after each learner loss."""

    events = ("loss",)
    mode = "lockstep"

    def __init__(self, buffer: ReplayBuffer, key: str = "td_error", name: str | None = None) -> None:
        super().__init__(name)
        if not hasattr(buffer.sampler, "update_priority"):
            raise TypeError(f"PriorityUpdate needs a buffer whose sampler has update_priority (a "
                            f"PrioritizedSampler), got {type(buffer.sampler).__name__}")
        self.buffer = buffer
        self.key = key

    def on_event(self, event: Event) -> None:
        out = event.data["loss"]
        if self.key not in out.keys():
            raise KeyError(f"PriorityUpdate: the loss output has no {self.key!r} (keys: {sorted(out.keys())}); "
                           "pass key= naming the per-row TD error")
        self.buffer.sampler.update_priority(event.data["batch"]["index"], out[self.key])  # type: ignore[attr-defined]
