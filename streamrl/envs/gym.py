"""The gymnasium adapter: a vector of envs with specs and one auto-reset convention.

::

    env = GymEnv("CartPole-v1", num_envs=8, seed=0)
    obs = env.reset()                                  # numpy [8, 4]
    step = env.step(np.zeros(8, dtype=np.int64))
    step.observation        # [8, 4]: the observation each env shows *now* (a reset one after an episode end)
    step.next_observation   # [8, 4]: the observation the action led to (the terminal one at an episode end)
    step.terminated, step.truncated, step.reward

Backends (``backend=``):

* ``"native"`` — gymnasium's vector entry point (CartPole ships one): one process, vectorized numpy, fastest.
  These envs auto-reset on the *next* step: the step after an episode end resets that env, ignores its action
  and returns reward 0. :class:`GymEnv` flags such steps in ``step.valid`` (False) so that stages drop them;
  they are not transitions.
* ``"sync"`` — ``SyncVectorEnv`` in this process, auto-reset on the *same* step (``final_obs``).
* ``"subprocess"`` — ``AsyncVectorEnv``: one process per env, observations in shared memory; ``step_async`` /
  ``wait_ready`` let an async stage await the workers without blocking its event loop.
* ``"auto"`` — native where the env has a vector entry point, else sync.

The object is picklable before it is opened, so a stage group holding it can move to a worker process; the
gymnasium env is created on first use in the process that uses it.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from streamrl.envs.specs import Composite, Spec, Unbounded, spec_from_space
from streamrl.errors import EnvError

Backend = Literal["auto", "native", "sync", "subprocess"]


@dataclass
class VectorStep:
    """The result of one vector step; arrays have the env batch as first dim."""

    observation: np.ndarray
    next_observation: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray | None  # None: every env made a real transition (same-step auto-reset backends)


class GymEnv:
    """A vectorized gymnasium env with specs; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        num_envs: int = 1,
        backend: Backend = "auto",
        seed: int | None = None,
        **make_kwargs: Any,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"GymEnv({name!r}): num_envs must be >= 1, got {num_envs}")
        if backend not in ("auto", "native", "sync", "subprocess"):
            raise ValueError(f"GymEnv({name!r}): backend must be auto/native/sync/subprocess, got {backend!r}")
        self.name = name
        self.num_envs = num_envs
        self.backend = backend
        self.seed = seed
        self.make_kwargs = make_kwargs
        self._env: Any = None
        self._pending_reset: np.ndarray | None = None
        self.autoreset: Literal["next_step", "same_step"] = "same_step"

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def env_id(self) -> str:
        """The registered id; ``"package.module:Env-v0"`` imports the module (which registers it) first."""
        module, sep, env_id = self.name.rpartition(":")
        if sep:
            importlib.import_module(module)
            return env_id
        return self.name

    def _resolve_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        spec = gym.spec(self.env_id)
        return "native" if spec.vector_entry_point is not None else "sync"

    def open(self) -> GymEnv:
        """Create the gymnasium vector env (idempotent)."""
        if self._env is not None:
            return self
        backend = self._resolve_backend()
        try:
            if backend == "native":
                self._env = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode="vector_entry_point",
                                         **self.make_kwargs)
            else:
                mode = "sync" if backend == "sync" else "async"
                kwargs = {"autoreset_mode": AutoresetMode.SAME_STEP}
                if mode == "async":
                    kwargs["shared_memory"] = True  # type: ignore[assignment]
                self._env = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode=mode,
                                         vector_kwargs=kwargs, **self.make_kwargs)
        except gym.error.Error as exc:
            raise EnvError(f"cannot make gymnasium env {self.name!r} with backend {backend!r}: {exc}") from exc
        mode = self._env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode == AutoresetMode.NEXT_STEP:
            self.autoreset = "next_step"
        elif mode == AutoresetMode.SAME_STEP:
            self.autoreset = "same_step"
        else:
            raise EnvError(f"env {self.name!r} uses auto-reset mode {mode}; streamrl supports NEXT_STEP and SAME_STEP")
        self.resolved_backend = backend
        return self

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # reopened lazily where it is used
        state["_pending_reset"] = None
        return state

    # -- specs ---------------------------------------------------------------------------------------------
    @property
    def observation_spec(self) -> Spec | Composite:
        return spec_from_space(self.open()._env.single_observation_space)

    @property
    def action_spec(self) -> Spec | Composite:
        return spec_from_space(self.open()._env.single_action_space)

    @property
    def reward_spec(self) -> Spec:
        return Unbounded(shape=(1,), dtype="float32")

    # -- stepping ------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> np.ndarray:
        env = self.open()._env
        seed = self.seed if seed is None else seed
        obs, _ = env.reset(seed=seed)
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)
        return np.asarray(obs)

    def step(self, actions: np.ndarray) -> VectorStep:
        """Step every env once with ``actions`` (numpy, env batch first)."""
        if self._pending_reset is None:
            raise EnvError(f"GymEnv({self.name!r}).step called before reset(); call env.reset() first")
        result = self._env.step(actions)
        return self._convert(*result)

    def step_async(self, actions: np.ndarray) -> None:
        """Start a step on a subprocess backend; follow with ``await wait_ready()`` and ``step_wait()``."""
        self._env.step_async(actions)

    async def wait_ready(self) -> None:
        """Await until every subprocess worker has answered, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        pipes = [p for p in self._env.parent_pipes if p is not None]
        waiting = [p for p in pipes if not p.poll()]
        if not waiting:
            return
        fut: asyncio.Future[None] = loop.create_future()
        left = {p.fileno() for p in waiting}

        def ready(fd: int) -> None:
            loop.remove_reader(fd)
            left.discard(fd)
            if not left and not fut.done():
                fut.set_result(None)

        for p in waiting:
            loop.add_reader(p.fileno(), ready, p.fileno())
        try:
            await fut
        finally:
            for fd in left:
                loop.remove_reader(fd)

    def step_wait(self) -> VectorStep:
        return self._convert(*self._env.step_wait())

    @property
    def vector_env(self) -> Any:
        """The gymnasium vector env itself (opened), for stages that record its raw output."""
        return self.open()._env

    @property
    def is_subprocess(self) -> bool:
        return self.open().resolved_backend == "subprocess"

    def _convert(self, obs: Any, reward: Any, terminated: Any, truncated: Any, info: dict[str, Any]) -> VectorStep:
        obs = np.asarray(obs)
        if self.autoreset == "next_step":
            valid = None
            pending = self._pending_reset
            if pending is not None and pending.any():
                valid = ~pending
            self._pending_reset = np.logical_or(terminated, truncated)
            return VectorStep(obs, obs, reward, terminated, truncated, valid)
        next_obs = obs
        mask = info.get("_final_obs")
        if mask is not None and mask.any():
            next_obs = obs.copy()
            finals = info["final_obs"]
            for i in np.flatnonzero(mask):
                next_obs[i] = finals[i]
        return VectorStep(obs, next_obs, reward, terminated, truncated, None)

    def __repr__(self) -> str:
        return f"GymEnv({self.name!r}, num_envs={self.num_envs}, backend={self.backend!r})"
