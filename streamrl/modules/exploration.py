"""Exploration modules: keyed modules that perturb the action a greedy actor chose.

::

    explore = EGreedyModule(spec=env.action_spec, eps_init=1.0, eps_end=0.05, annealing_frames=10_000)
    explore = EGreedyModule(2, eps_init=1.0, eps_end=0.05)   # no spec: index actions in [0, 2)
    policy = TensorDictSequential(actor, explore)
    explore.step(frames=256)        # anneal (the EpsilonAnnealing hook calls this after every chunk)
    explore.eps                     # the current epsilon
    with set_interaction_type(InteractionType.DETERMINISTIC):
        policy(td)                  # greedy: exploration is off in deterministic mode (evaluation)
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, TensorDictModuleBase, interaction_type

from streamrl.envs.specs import Categorical, OneHot

_GREEDY = (InteractionType.DETERMINISTIC, InteractionType.MODE, InteractionType.MEAN)


class EGreedyModule(TensorDictModuleBase):
    """With probability ``eps`` replace ``action`` by a uniformly random one; ``eps`` anneals linearly in frames.

    ``eps`` goes from ``eps_init`` to ``eps_end`` over ``annealing_frames`` frames counted by :meth:`step`, then
    stays at ``eps_end``. Random actions come from ``spec``: indices for a :class:`Categorical`, one-hot vectors
    for a :class:`OneHot` (each sample's whole action is replaced, never part of it). Without a spec, actions are
    indices in ``[0, n_actions)``. The frame count is saved in ``state_dict()``; deterministic interaction types
    (``DETERMINISTIC``, ``MODE``, ``MEAN``) switch exploration off.
    """

    def __init__(
        self,
        n_actions: int | None = None,
        *,
        spec: Categorical | OneHot | None = None,
        eps_init: float = 1.0,
        eps_end: float = 0.05,
        annealing_frames: int = 10_000,
        action_key: str = "action",
    ) -> None:
        super().__init__()
        if not 0.0 <= eps_end <= 1.0 or not 0.0 <= eps_init <= 1.0:
            raise ValueError(f"EGreedyModule: eps_init and eps_end must be in [0, 1], got {eps_init=}, {eps_end=}")
        if annealing_frames < 1:
            raise ValueError(f"EGreedyModule: annealing_frames must be >= 1, got {annealing_frames=}")
        if spec is None:
            if n_actions is None or n_actions < 1:
                raise ValueError(f"EGreedyModule: pass spec= (the action spec) or n_actions >= 1, got {n_actions=}")
            spec = Categorical(shape=(), dtype=torch.int64, n=n_actions)
        elif not isinstance(spec, (Categorical, OneHot)):
            raise TypeError(f"EGreedyModule: spec must be a Categorical or OneHot action spec, got {spec!r}")
        elif n_actions is not None and n_actions != spec.n:
            raise ValueError(f"EGreedyModule: {n_actions=} disagrees with the spec's n={spec.n}; pass one of them")
        self.spec = spec
        self.n_actions = spec.n
        self._event_dims = len(spec.shape)  # trailing action dims that one random draw replaces as a whole
        self.eps_init = eps_init
        self.eps_end = eps_end
        self.annealing_frames = annealing_frames
        self.in_keys = [action_key]  # type: ignore[assignment]
        self.out_keys = [action_key]  # type: ignore[assignment]
        self.frames = 0
        self._eps = eps_init

    @property
    def eps(self) -> float:
        """The current epsilon (the probability of a random action)."""
        return self._eps

    def step(self, frames: int = 1) -> None:
        """Advance the schedule by ``frames`` env frames."""
        self.frames += frames
        progress = min(1.0, self.frames / self.annealing_frames)
        self._eps = self.eps_init + (self.eps_end - self.eps_init) * progress

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._eps <= 0.0 or interaction_type() in _GREEDY:
            return tensordict
        key = self.in_keys[0]
        action = tensordict.get(key)
        if self._event_dims == 0:  # the common case (one index per sample), kept to two small kernels
            mask = torch.rand(action.shape, device=action.device) < self._eps
            if mask.any():
                random_action = torch.randint(0, self.n_actions, action.shape, device=action.device, dtype=action.dtype)
                tensordict.set(key, torch.where(mask, random_action, action))
            return tensordict
        batch = action.shape[: action.ndim - self._event_dims]
        mask = torch.rand(batch, device=action.device) < self._eps
        if mask.any():
            random_action = self.spec.rand(batch).to(device=action.device, dtype=action.dtype)
            tensordict.set(key, torch.where(mask.reshape(*batch, *(1,) * self._event_dims), random_action, action))
        return tensordict

    def get_extra_state(self) -> dict[str, Any]:
        return {"frames": self.frames}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.frames = 0
        self.step(int(state["frames"]))
