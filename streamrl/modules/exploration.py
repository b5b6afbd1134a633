"""Exploration modules: keyed modules that perturb the action a greedy actor chose.

::

    explore = EGreedyModule(spec=env.action_spec, eps_init=1.0, eps_end=0.05, annealing_frames=10_000)
    explore = EGreedyModule(2, eps_init=1.0, eps_end=0.05)   # no spec: index actions in [0, 2)
    policy = TensorDictSequential(actor, explore)
    explore.step(frames=256)        # anneal (the EpsilonAnnealing hook calls this after every chunk)
    explore.eps                     # the current epsilon
    with set_interaction_type(InteractionType.DETERMINISTIC):
        policy(td)                  # greedy: exploration is off in deterministic mode (evaluation)

    # continuous actions (DDPG, TD3): noise added to a deterministic actor's action, clipped to the spec
    explore = AdditiveGaussianModule(env.action_spec, sigma_init=1.0, sigma_end=0.1, annealing_frames=10_000)
    explore = OrnsteinUhlenbeckModule(env.action_spec, theta=0.15, sigma=0.2)   # temporally correlated
    policy = TensorDictSequential(Actor(MLP(n_act), spec=env.action_spec), explore)
    pipeline.add_hook(EpsilonAnnealing(explore), group="collect")   # the same hook anneals sigma

Each module reports its schedule as plain floats, ``scalars()`` (:class:`ReportsScalars`): ``{"epsilon": ...}``,
``{"sigma": ...}``. The policy stage publishes them in an ``explore`` event at each chunk's start, and the
``Logger`` hook writes them as ``explore/epsilon``, ``explore/sigma``: any module of a policy with a ``scalars()``
method is logged the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, TensorDictModuleBase, interaction_type

from streamrl.envs.specs import Bounded, Categorical, OneHot, Unbounded
from streamrl.errors import ConfigError, torchrl_names
from streamrl.modules.actors import register_bounds

_GREEDY = (InteractionType.DETERMINISTIC, InteractionType.MODE, InteractionType.MEAN)


@runtime_checkable
class ReportsScalars(Protocol):
    """A module of a policy that reports figures to log (an exploration schedule's epsilon or noise scale).

    ``scalars()`` returns plain floats by name (no tensors: the event that carries them may cross to another
    process); the policy stage publishes them at each chunk's start (an ``explore`` event).
    """

    def scalars(self) -> dict[str, float]: ...


class EGreedyModule(TensorDictModuleBase):
    """With probability ``eps`` replace ``action`` by a uniformly random one; ``eps`` anneals linearly in frames.

    ``eps`` goes from ``eps_init`` to ``eps_end`` over ``annealing_frames`` frames counted by :meth:`step`, then
    stays at ``eps_end``. Random actions come from ``spec``: indices for a :class:`Categorical`, one-hot vectors
    for a :class:`OneHot` (each sample's whole action is replaced, never part of it). Without a spec, actions are
    indices in ``[0, n_actions)``. The frame count is saved in ``state_dict()``; deterministic interaction types
    (``DETERMINISTIC``, ``MODE``, ``MEAN``) switch exploration off. TorchRL's ``annealing_num_steps`` (the same
    count: frames passed to ``step``) is accepted for ``annealing_frames``.
    """

    @torchrl_names("EGreedyModule", accept={"annealing_num_steps": "annealing_frames"})
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
            raise ConfigError(f"EGreedyModule: eps_init and eps_end must be in [0, 1], got {eps_init=}, {eps_end=}")
        if annealing_frames < 1:
            raise ConfigError(f"EGreedyModule: annealing_frames must be >= 1, got {annealing_frames=}")
        if spec is None:
            if n_actions is None or n_actions < 1:
                raise ConfigError(f"EGreedyModule: pass spec= (the action spec) or n_actions >= 1, got {n_actions=}")
            spec = Categorical(shape=(), dtype=torch.int64, n=n_actions)
        elif not isinstance(spec, (Categorical, OneHot)):
            raise TypeError(f"EGreedyModule: spec must be a Categorical or OneHot action spec, got {spec!r}")
        elif n_actions is not None and n_actions != spec.n:
            raise ConfigError(f"EGreedyModule: {n_actions=} disagrees with the spec's n={spec.n}; pass one of them")
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

    def scalars(self) -> dict[str, float]:
        """``{"epsilon": eps}``: what the policy stage publishes for the Logger (``explore/epsilon``)."""
        return {"epsilon": float(self._eps)}

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


class _ActionNoise(TensorDictModuleBase, ABC):
    """Adds noise of an annealed scale ``sigma`` to ``action`` and clips the result into a Bounded spec.

    ``sigma`` goes linearly from ``sigma_init`` to ``sigma_end`` over ``annealing_frames`` frames counted by
    :meth:`step` (as :class:`EGreedyModule`'s epsilon; the ``EpsilonAnnealing`` hook drives either). The frame
    count is saved in ``state_dict()``; deterministic interaction types switch the noise off. Subclasses give
    the noise (``_noise``).
    """

    low: torch.Tensor | None
    high: torch.Tensor | None

    def __init__(self, spec: Bounded | Unbounded, *, sigma_init: float, sigma_end: float, annealing_frames: int,
                 action_key: str) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(spec, (Bounded, Unbounded)) or not spec.dtype.is_floating_point:
            raise TypeError(f"{name}: spec must be a floating-point Bounded or Unbounded action spec, got {spec!r}")
        if sigma_init < 0 or sigma_end < 0:
            raise ConfigError(f"{name}: sigma must be >= 0, got {sigma_init=}, {sigma_end=}")
        if annealing_frames < 1:
            raise ConfigError(f"{name}: annealing_frames must be >= 1, got {annealing_frames=}")
        self.spec = spec
        if isinstance(spec, Bounded):
            register_bounds(self, spec.low, spec.high)
        else:
            self.low = self.high = None
        self.sigma_init = sigma_init
        self.sigma_end = sigma_end
        self.annealing_frames = annealing_frames
        self.in_keys = [action_key]  # type: ignore[assignment]
        self.out_keys = [action_key]  # type: ignore[assignment]
        self.frames = 0
        self._sigma = sigma_init

    @property
    def sigma(self) -> float:
        """The current noise scale."""
        return self._sigma

    def scalars(self) -> dict[str, float]:
        """``{"sigma": sigma}``: what the policy stage publishes for the Logger (``explore/sigma``)."""
        return {"sigma": float(self._sigma)}

    def step(self, frames: int = 1) -> None:
        """Advance the schedule by ``frames`` env frames."""
        self.frames += frames
        progress = min(1.0, self.frames / self.annealing_frames)
        self._sigma = self.sigma_init + (self.sigma_end - self.sigma_init) * progress

    @abstractmethod
    def _noise(self, action: torch.Tensor, tensordict: TensorDictBase) -> torch.Tensor | float:
        """The noise to add to ``action`` (in action units)."""

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if interaction_type() in _GREEDY:
            return tensordict
        key = self.in_keys[0]
        action = tensordict.get(key)
        action = action + self._noise(action, tensordict)
        if self.low is not None and self.high is not None:
            action = torch.clamp(action, self.low, self.high)
        return tensordict.set(key, action)

    def get_extra_state(self) -> dict[str, Any]:
        return {"frames": self.frames}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.frames = 0
        self.step(int(state["frames"]))


class AdditiveGaussianModule(_ActionNoise):
    """``action + mean + sigma * N(0, 1)``, independent per element, clipped into a Bounded spec's bounds.

    ``sigma`` (in action units) anneals linearly from ``sigma_init`` to ``sigma_end`` over ``annealing_frames``
    frames counted by :meth:`step`; ``mean`` shifts the noise. Off under ``DETERMINISTIC``, ``MODE`` and
    ``MEAN`` (evaluation); the frame count is saved in ``state_dict()``. TorchRL's ``annealing_num_steps`` is
    accepted for ``annealing_frames``.
    """

    @torchrl_names("AdditiveGaussianModule", accept={"annealing_num_steps": "annealing_frames"})
    def __init__(
        self,
        spec: Bounded | Unbounded,
        *,
        sigma_init: float = 1.0,
        sigma_end: float = 0.1,
        annealing_frames: int = 1000,
        mean: float = 0.0,
        action_key: str = "action",
    ) -> None:
        super().__init__(spec, sigma_init=sigma_init, sigma_end=sigma_end, annealing_frames=annealing_frames,
                         action_key=action_key)
        self.mean = mean

    def _noise(self, action: torch.Tensor, tensordict: TensorDictBase) -> torch.Tensor | float:
        if self._sigma == 0.0:
            return self.mean
        return self.mean + self._sigma * torch.randn_like(action)


class OrnsteinUhlenbeckModule(_ActionNoise):
    """Temporally correlated noise (DDPG): ``action + sigma * z``, ``z`` an Ornstein-Uhlenbeck process per env.

    Each call advances ``z <- z - theta * z * dt + sqrt(dt) * N(0, 1)`` (one state per action element, so per
    env), then adds ``sigma * z`` and clips into a Bounded spec. For a constant ``sigma`` this is the usual OU
    process ``n <- n - theta * n * dt + sigma * sqrt(dt) * N(0, 1)``: it reverts to 0 at rate ``theta`` (lag-1
    autocorrelation ``1 - theta * dt``) with stationary std ``sigma / sqrt(2 * theta)`` for small ``dt``.
    Keeping ``z`` in units of ``sigma`` lets an annealed ``sigma`` (to ``sigma_end`` over ``annealing_frames``
    frames counted by :meth:`step`; ``None``: constant) take effect at once.

    ``z`` starts at 0 and is reset to 0 for rows whose episode starts, read from ``reset_key``: a bool entry
    marks starts with True, an integer one (a step counter, ``"step_count"`` by default) with 0. The policy
    stage's requests hold it when the env writes it (``TransformedEnv(env, StepCounter())``); the fast path
    (a plain ``GymEnv``) sends only ``observation``, and without the entry ``z`` runs on across episodes. The
    state is per batch row, so one module serves one env group: with two groups sharing a policy stage
    (double buffering) their envs would share states. ``z`` restarts at 0 when the batch shape changes; it
    is not saved in ``state_dict()`` (the frame count is). Off under ``DETERMINISTIC``, ``MODE``, ``MEAN``.
    TorchRL's ``annealing_num_steps`` is accepted for ``annealing_frames``.
    """

    @torchrl_names("OrnsteinUhlenbeckModule", accept={"annealing_num_steps": "annealing_frames"})
    def __init__(
        self,
        spec: Bounded | Unbounded,
        *,
        theta: float = 0.15,
        sigma: float = 0.2,
        dt: float = 1e-2,
        sigma_end: float | None = None,
        annealing_frames: int = 1000,
        action_key: str = "action",
        reset_key: str | None = "step_count",
    ) -> None:
        super().__init__(spec, sigma_init=sigma, sigma_end=sigma if sigma_end is None else sigma_end,
                         annealing_frames=annealing_frames, action_key=action_key)
        if theta < 0 or dt <= 0:
            raise ConfigError(f"OrnsteinUhlenbeckModule: needs theta >= 0 and dt > 0, got {theta=}, {dt=}")
        self.theta = theta
        self.dt = dt
        self.reset_key = reset_key
        self.state: torch.Tensor | None = None  # z, shaped as the last action

    def _noise(self, action: torch.Tensor, tensordict: TensorDictBase) -> torch.Tensor | float:
        z = self.state
        if z is None or z.shape != action.shape:
            z = torch.zeros_like(action)
        else:
            z = z.to(device=action.device, dtype=action.dtype)
        flag = tensordict.get(self.reset_key, None) if self.reset_key is not None else None
        if flag is not None:
            start = flag if flag.dtype == torch.bool else flag == 0
            event = action.ndim - tensordict.batch_dims
            z = torch.where(start.reshape(*tensordict.batch_size, *(1,) * event), 0.0, z)
        z = z - self.theta * self.dt * z + math.sqrt(self.dt) * torch.randn_like(z)
        self.state = z
        return self._sigma * z
