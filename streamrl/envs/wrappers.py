"""Per-env gymnasium wrappers a :class:`~streamrl.envs.gym.GymEnv` applies inside each env, set before it opens.

::

    env = GymEnv("CartPole-v1", num_envs=8, backend="subprocess",
                 wrappers=[NoopReset(30), SkipFrames(4), StepLimit(200)])   # innermost first
    env.add_wrapper(gymnasium.wrappers.RecordEpisodeStatistics)             # any picklable env -> env callable
    env.reset()                                                             # the envs are made, wrapped, here
    env.add_wrapper(StepLimit(100))                                         # EnvError: it is open already

A vector env steps all its envs at once, so what concerns one env's episode cannot be done from outside it: a
no-op start steps one env alone after its reset, a frame skip must stop at that env's episode end. These wrappers
run inside each env, on the backend's worker (``"subprocess"``) or in this process (``"sync"``); gymnasium's native
vector envs take none.

* :class:`NoopReset` — after each reset, 1 to ``noops`` (uniformly drawn) no-op actions;
* :class:`SkipFrames` — each action repeated ``skip`` times, rewards summed, stopping at an episode end;
* :class:`StepLimit` — the episode is truncated after ``max_steps`` steps (of the wrappers below it: placed after
  ``SkipFrames`` it counts agent steps).

:class:`TransformObservations` is what ``GymEnv(worker_transform=...)`` adds last: it runs observation transforms
(``ToTensorImage``, ``GrayScale``, ``Resize``, ``CatFrames``, ``ObservationNorm``...) on each env's observation
where the env steps, and declares the transformed observation space, so that subprocess workers share the small
transformed frames rather than the rendered ones. Each env holds its own copy of the transform: a stateful one
(``CatFrames``) keeps its state per env and resets it on that env's reset, as it does in a ``TransformedEnv``.
This module knows transforms only by the :class:`ObservationTransform` protocol (``envs`` never imports
``transforms``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit
from tensordict import TensorDict, TensorDictBase

from streamrl.envs.specs import Bounded, Composite, Spec, Unbounded, spec_from_space
from streamrl.errors import ConfigError

EnvWrapper = Callable[[gym.Env], gym.Wrapper]  # type: ignore[type-arg]
"""What ``GymEnv(wrappers=...)`` takes: a picklable callable wrapping one gymnasium env (a wrapper class too)."""


@dataclass(frozen=True)
class NoopReset:
    """After every reset, 1 to ``noops`` (uniformly drawn from the env's own RNG) no-op actions: action 0, or zeros
    for Box actions; an episode that ends during them is reset again."""

    noops: int = 30

    def __post_init__(self) -> None:
        if self.noops < 1:
            raise ConfigError(f"NoopReset: noops must be >= 1, got {self.noops}")

    def __call__(self, env: gym.Env) -> gym.Wrapper:  # type: ignore[type-arg]
        return NoopResetWrapper(env, self.noops)


@dataclass(frozen=True)
class SkipFrames:
    """Repeat every action ``skip`` times, summing the rewards and stopping at an episode end."""

    skip: int

    def __post_init__(self) -> None:
        if self.skip < 1:
            raise ConfigError(f"SkipFrames: skip must be >= 1, got {self.skip}")

    def __call__(self, env: gym.Env) -> gym.Wrapper:  # type: ignore[type-arg]
        return FrameSkipWrapper(env, self.skip)


@dataclass(frozen=True)
class StepLimit:
    """Truncate each episode after ``max_steps`` steps (gymnasium's ``TimeLimit``; the env's registered limit,
    applied under every wrapper, still holds when shorter)."""

    max_steps: int

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"StepLimit: max_steps must be >= 1, got {self.max_steps}")

    def __call__(self, env: gym.Env) -> gym.Wrapper:  # type: ignore[type-arg]
        return TimeLimit(env, self.max_steps)


class NoopResetWrapper(gym.Wrapper):  # type: ignore[type-arg]
    """The gymnasium wrapper behind :class:`NoopReset`."""

    def __init__(self, env: gym.Env, noops: int) -> None:  # type: ignore[type-arg]
        super().__init__(env)
        self.noops = noops
        space = env.action_space
        self.noop_action: Any = np.zeros(space.shape, dtype=space.dtype) if isinstance(space, spaces.Box) else 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        for _ in range(int(self.np_random.integers(1, self.noops + 1))):
            obs, _, terminated, truncated, info = self.env.step(self.noop_action)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class FrameSkipWrapper(gym.Wrapper):  # type: ignore[type-arg]
    """The gymnasium wrapper behind :class:`SkipFrames`."""

    def __init__(self, env: gym.Env, skip: int) -> None:  # type: ignore[type-arg]
        super().__init__(env)
        self.skip = skip

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        total = 0.0
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


# -- observation transforms where the env steps ---------------------------------------------------------------
class ObservationTransform(Protocol):
    """What :class:`TransformObservations` needs of a transform (``streamrl.transforms`` provides them)."""

    def runs_in_env_workers(self) -> bool:
        """True when it reads and writes observation entries only, one env at a time."""

    def transform_observation_spec(self, spec: Composite) -> Composite:
        """The observation spec after the transform."""

    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        """Transform the observations of a reset (per-env state restarts)."""

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        """Transform the observations a step led to."""


def check_worker_transform(transform: Any, who: str) -> None:
    """Raise :class:`ConfigError` unless ``transform`` can run inside the env workers."""
    runs = getattr(transform, "runs_in_env_workers", None)
    if runs is None or not callable(runs):
        raise ConfigError(f"{who}: worker_transform must be a streamrl transform (ToTensorImage, Compose(...), ...), "
                          f"got {transform!r}")
    if not runs():
        raise ConfigError(
            f"{who}: worker_transform={transform!r} holds a transform that does more than transform observations "
            "one env at a time (step counters, reward transforms, video recorders...); only observation "
            "transforms (ToTensorImage, GrayScale, Resize, CatFrames, ObservationNorm, DoubleToFloat, CatTensors) "
            "run in the env workers. Keep the others in a TransformedEnv around the GymEnv"
        )
    if getattr(transform, "container", None) is not None:
        raise ConfigError(f"{who}: worker_transform={transform!r} belongs to a Compose or a TransformedEnv already; "
                          "give the GymEnv transforms of its own")


def space_from_spec(spec: Spec) -> spaces.Box:
    """The gymnasium Box of a Bounded or Unbounded spec (its shape, dtype and bounds)."""
    dtype = torch.empty((), dtype=spec.dtype).numpy().dtype
    if isinstance(spec, Bounded):
        return spaces.Box(low=spec.low.cpu().numpy(), high=spec.high.cpu().numpy(), shape=tuple(spec.shape),
                          dtype=dtype)
    if isinstance(spec, Unbounded):
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return spaces.Box(low=info.min, high=info.max, shape=tuple(spec.shape), dtype=dtype)
        return spaces.Box(low=-np.inf, high=np.inf, shape=tuple(spec.shape), dtype=dtype)
    raise ConfigError(f"an observation transform in the env workers must give Bounded or Unbounded entries, got "
                      f"{spec!r}")


class TransformObservations(gym.Wrapper):  # type: ignore[type-arg]
    """Run ``transform`` on one env's observations as it resets and steps; see the module docstring.

    ``key`` names an observation that is not a dict (``"pixels"`` or ``"observation"``, as the GymEnv names it).
    The transform sees a TensorDict of batch ``[1]``, as one row of a ``TransformedEnv``'s batch; the result
    is an array when the transform leaves that one key, else a dict.

    ``parent_pid``: the process that opens the vector env. Made in any other (a subprocess worker), the wrapper
    sets torch to one thread there before its first torch call: the workers share the machine's cores, and a
    child forked from a process whose OpenMP pool ran deadlocks in its first parallel region otherwise.
    """

    def __init__(self, env: gym.Env, transform: ObservationTransform, *, key: str,  # type: ignore[type-arg]
                 parent_pid: int | None = None) -> None:
        super().__init__(env)
        if parent_pid is not None and os.getpid() != parent_pid:
            torch.set_num_threads(1)
        self.transform = copy.deepcopy(transform)  # each env its own state (a sync backend shares the factory)
        self.key = key
        base = spec_from_space(env.observation_space)
        spec = base if isinstance(base, Composite) else Composite({key: base})
        try:
            out = self.transform.transform_observation_spec(spec)
        except Exception as exc:
            raise ConfigError(f"worker_transform {transform!r} cannot transform the observation spec {spec!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self._as_array = not isinstance(base, Composite) and list(out.keys()) == [key]
        if self._as_array:
            self.observation_space = space_from_spec(out[key])  # type: ignore[arg-type]
        else:
            self.observation_space = spaces.Dict({k: space_from_spec(s) for k, s in out.items()})  # type: ignore[arg-type]
        self._root = TensorDict({}, batch_size=[1])  # the root a step starts from (observation transforms ignore it)

    def _tensordict(self, obs: Any) -> TensorDict:
        items = obs.items() if isinstance(obs, dict) else [(self.key, obs)]
        return TensorDict({k: torch.as_tensor(np.asarray(v)).unsqueeze(0) for k, v in items}, batch_size=[1])

    def _observation(self, td: TensorDictBase) -> Any:
        if self._as_array:
            return td.get(self.key)[0].numpy()
        return {k: td.get(k)[0].numpy() for k in self.observation_space.spaces}  # type: ignore[attr-defined]

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self._observation(self.transform._reset(self._tensordict(obs), None)), info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        next_td = self.transform._step(self._root, self._tensordict(obs))
        return self._observation(next_td), reward, terminated, truncated, info
