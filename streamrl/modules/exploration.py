"""Exploration modules: keyed modules that perturb the action a greedy actor chose.

::

    explore = EGreedy(n_actions=2, eps_init=1.0, eps_end=0.05, annealing_frames=10_000)
    policy = TensorDictSequential(actor, explore)
    explore.step(frames=256)        # anneal (a hook calls this after every chunk)
    with set_interaction_type(InteractionType.DETERMINISTIC):
        policy(td)                  # greedy: exploration is off in deterministic mode (evaluation)
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, TensorDictModuleBase, interaction_type

_GREEDY = (InteractionType.DETERMINISTIC, InteractionType.MODE, InteractionType.MEAN)


class EGreedy(TensorDictModuleBase):
    """With probability ``eps`` replace ``action`` (an index) by a uniform random one; ``eps`` anneals in frames."""

    def __init__(
        self,
        n_actions: int,
        *,
        eps_init: float = 1.0,
        eps_end: float = 0.05,
        annealing_frames: int = 10_000,
        action_key: str = "action",
    ) -> None:
        super().__init__()
        if not 0.0 <= eps_end <= 1.0 or not 0.0 <= eps_init <= 1.0:
            raise ValueError(f"EGreedy: eps_init and eps_end must be in [0, 1], got {eps_init}, {eps_end}")
        if annealing_frames < 1:
            raise ValueError(f"EGreedy: annealing_frames must be >= 1, got {annealing_frames}")
        self.n_actions = n_actions
        self.eps_init = eps_init
        self.eps_end = eps_end
        self.annealing_frames = annealing_frames
        self.in_keys = [action_key]  # type: ignore[assignment]
        self.out_keys = [action_key]  # type: ignore[assignment]
        self.frames = 0
        self.eps = eps_init

    def step(self, frames: int = 1) -> None:
        """Advance the schedule by ``frames`` env frames."""
        self.frames += frames
        progress = min(1.0, self.frames / self.annealing_frames)
        self.eps = self.eps_init + (self.eps_end - self.eps_init) * progress

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if interaction_type() in _GREEDY or self.eps <= 0.0:
            return tensordict
        key = self.in_keys[0]
        action = tensordict.get(key)
        mask = torch.rand(action.shape) < self.eps
        if mask.any():
            random_action = torch.randint(0, self.n_actions, mask.shape, device=action.device)
            tensordict.set(key, torch.where(mask, random_action.to(action.dtype), action))
        return tensordict

    def get_extra_state(self) -> dict[str, Any]:
        return {"frames": self.frames, "eps": self.eps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.frames = state["frames"]
        self.eps = state["eps"]
