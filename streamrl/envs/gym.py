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
* ``"auto"`` — native where the env has a vector entry point and nothing wraps the envs, else sync.

What runs inside each env is set before the env opens (see :mod:`streamrl.envs.wrappers`):

* ``wrappers=[NoopReset(30), SkipFrames(4), StepLimit(200)]`` (or ``env.add_wrapper(...)``): gymnasium wrappers
  around each env, innermost first;
* ``worker_transform=Compose(ToTensorImage(dtype=torch.uint8), GrayScale(), Resize(64, 64), CatFrames(4))``:
  observation transforms run where each env steps (in its subprocess worker), after the wrappers and the
  rendering. The specs and the observations are the transformed ones, and the workers share 4x64x64 frames
  instead of 400x600x3 renders: pixel collection grows with the workers. Transforms of rewards, step counters
  and the like stay in a :class:`~streamrl.transforms.TransformedEnv` around the GymEnv.

The object is picklable before it is opened, so a stage group holding it can move to a worker process; the
gymnasium env is created on first use in the process that uses it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import AddRenderObservation
from tensordict import TensorDict, TensorDictBase

from streamrl.envs.base import EnvBase, as_tensordict
from streamrl.envs.specs import Categorical, Composite, Spec, spec_from_space
from streamrl.envs.workers import WatchWorkers, async_vector_env, raise_if_workers_died, watch_workers
from streamrl.envs.wrappers import (
    EnvWrapper,
    ObservationTransform,
    SkipFrames,
    TransformObservations,
    check_worker_transform,
)
from streamrl.errors import ConfigError, EnvError

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


class GymEnv(EnvBase):
    """A vectorized gymnasium env with specs and the TensorDict API; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        num_envs: int = 1,
        from_pixels: bool = False,
        pixels_only: bool = True,
        frame_skip: int = 1,
        wrappers: Sequence[EnvWrapper] = (),
        worker_transform: ObservationTransform | None = None,
        backend: Backend = "auto",
        device: str | torch.device = "cpu",
        seed: int | None = None,
        **make_kwargs: Any,
    ) -> None:
        if num_envs < 1:
            raise ConfigError(f"GymEnv({name!r}): num_envs must be >= 1, got {num_envs}")
        if backend not in ("auto", "native", "sync", "subprocess"):
            raise ConfigError(f"GymEnv({name!r}): backend must be auto/native/sync/subprocess, got {backend!r}")
        if frame_skip < 1:
            raise ConfigError(f"GymEnv({name!r}): frame_skip must be >= 1, got {frame_skip}")
        if worker_transform is not None:
            check_worker_transform(worker_transform, f"GymEnv({name!r})")
        self.name = name
        self.num_envs = num_envs
        self.batch_size = torch.Size([num_envs])
        self.from_pixels = from_pixels
        self.pixels_only = pixels_only
        self._wrappers: list[EnvWrapper] = [SkipFrames(frame_skip)] if frame_skip > 1 else []
        self.worker_transform = worker_transform
        self.backend = backend
        self.device = torch.device(device)
        self.seed = seed
        self.make_kwargs = make_kwargs
        self._env: Any = None
        self._pending_reset: np.ndarray | None = None
        self._current: dict[str, np.ndarray] | None = None  # the TensorDict API's latest root observations
        self._step_timeout: float | None = None
        self.autoreset: Literal["next_step", "same_step"] = "same_step"
        for wrapper in wrappers:
            self.add_wrapper(wrapper)

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def env_id(self) -> str:
        """The registered id; ``"package.module:Env-v0"`` imports the module (which registers it) first."""
        module, sep, env_id = self.name.rpartition(":")
        if sep:
            importlib.import_module(module)
            return env_id
        return self.name

    @property
    def is_open(self) -> bool:
        """Whether the gymnasium envs exist (made on first use; :meth:`close` ends them)."""
        return self._env is not None

    @property
    def wrappers(self) -> tuple[EnvWrapper, ...]:
        """The wrappers around each env, innermost first (``frame_skip=`` comes first as ``SkipFrames``)."""
        return tuple(self._wrappers)

    def add_wrapper(self, wrapper: EnvWrapper) -> GymEnv:
        """Wrap each env in ``wrapper`` too (outside those added before); only before the env opens.

        ``wrapper`` is called with each gymnasium env and returns the wrapped env: :class:`NoopReset`,
        :class:`SkipFrames`, :class:`StepLimit` from :mod:`streamrl.envs.wrappers`, a gymnasium wrapper class, a
        ``functools.partial`` of one. It must pickle (subprocess workers and worker groups receive it).
        """
        if not callable(wrapper):
            raise ConfigError(f"GymEnv({self.name!r}).add_wrapper takes a callable that wraps a gymnasium env "
                              f"(e.g. SkipFrames(4)), got {wrapper!r}")
        if self.is_open:
            raise EnvError(f"GymEnv({self.name!r}) is open already: wrappers apply when its envs are made, but "
                           f"{wrapper!r} came after. Add it before the first reset or step (in the constructor's "
                           "wrappers=[...] for one), or close the env first")
        if self.backend == "native":
            raise EnvError(f"GymEnv({self.name!r}) has backend='native', whose vector envs take no wrappers; "
                           f"to add {wrapper!r}, create it with backend='sync' or 'subprocess'")
        self._wrappers.append(wrapper)
        return self

    def _resolve_backend(self, same_step: bool) -> str:
        if self.backend != "auto":
            return self.backend
        if self.from_pixels:  # rendering is the slow part: render in worker processes
            return "subprocess" if self.num_envs > 1 else "sync"
        if self._wrappers or self.worker_transform is not None:
            return "sync"  # native vector envs take no wrappers
        spec = gym.spec(self.env_id)
        return "native" if spec.vector_entry_point is not None and not same_step else "sync"

    @property
    def _observation_key(self) -> str:
        """The key of an observation that is not a dict."""
        return "pixels" if self.from_pixels and self.pixels_only else "observation"

    def _env_wrappers(self) -> list[EnvWrapper]:
        """What wraps each env: the wrappers, the rendering, then the worker transform."""
        wrappers = list(self._wrappers)
        if self.from_pixels:
            wrappers.append(partial(AddRenderObservation, render_only=self.pixels_only, obs_key="observation"))
        if self.worker_transform is not None:
            wrappers.append(partial(TransformObservations, transform=self.worker_transform,
                                    key=self._observation_key, parent_pid=os.getpid()))
        return wrappers

    def open(self, *, same_step: bool = False) -> GymEnv:
        """Create the gymnasium vector env (idempotent).

        ``same_step``: the caller needs envs that reset on the step that ends an episode (the TensorDict API);
        ``backend="auto"`` then picks ``"sync"`` over a native vector env that resets on the next step.
        """
        if self._env is not None:
            if same_step and self.autoreset != "same_step":
                raise EnvError(
                    f"GymEnv({self.name!r}) runs gymnasium's native vector env, whose envs reset on the step after "
                    "an episode ends; the TensorDict API (reset/step/rollout) needs same-step resets. Create it "
                    "with backend='sync' (or 'subprocess') to use both, or a second GymEnv for rollouts."
                )
            return self
        backend = self._resolve_backend(same_step)
        make_kwargs = dict(self.make_kwargs)
        if self.from_pixels:
            make_kwargs.setdefault("render_mode", "rgb_array")
            if make_kwargs["render_mode"] == "rgb_array":
                _headless_sdl()
        try:
            if backend == "native":
                if self.from_pixels or self._wrappers or self.worker_transform is not None:
                    raise EnvError(f"GymEnv({self.name!r}): from_pixels, wrappers, frame_skip and worker_transform "
                                   "need backend 'sync' or 'subprocess' (gymnasium's native vector envs take no "
                                   "wrappers)")
                self._env = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode="vector_entry_point",
                                         **make_kwargs)
            else:
                mode = "sync" if backend == "sync" else "async"
                kwargs = {"autoreset_mode": AutoresetMode.SAME_STEP}
                if mode == "async":
                    kwargs["shared_memory"] = True  # type: ignore[assignment]
                self._env = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode=mode,
                                         vector_kwargs=kwargs, wrappers=self._env_wrappers(), **make_kwargs)
        except gym.error.Error as exc:
            raise EnvError(f"cannot make gymnasium env {self.name!r} with backend {backend!r}: {exc}") from exc
        # worker deaths, errors and hangs name the env and the worker
        self._env = watch_workers(self._env, self.name, self._step_timeout)
        self._adopt(backend)
        return self

    def _adopt(self, backend: str) -> None:
        """Read the opened vector env's auto-reset convention."""
        mode = self._env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode == AutoresetMode.NEXT_STEP:
            self.autoreset = "next_step"
        elif mode == AutoresetMode.SAME_STEP:
            self.autoreset = "same_step"
        else:
            raise EnvError(f"env {self.name!r} uses auto-reset mode {mode}; streamrl supports NEXT_STEP and SAME_STEP")
        self.resolved_backend = backend
        action = spec_from_space(self._env.single_action_space)
        # dims of an index action batch: a policy writing one-hot actions (one more dim) gets them converted
        self._index_ndim = 1 + len(action.shape) if isinstance(action, Categorical) else None

    @property
    def step_timeout(self) -> float | None:
        """Seconds the subprocess workers get to answer a ``reset`` or ``step`` (None, the default: no limit).

        An :class:`~streamrl.stages.env.EnvStage` sets it to its own ``step_timeout``. A worker that does not answer
        in time is killed and :class:`~streamrl.errors.EnvStepTimeout` names it. Other backends step in this
        process; the env stage bounds those calls itself.
        """
        return self._step_timeout

    @step_timeout.setter
    def step_timeout(self, seconds: float | None) -> None:
        self._step_timeout = seconds
        if isinstance(self._env, WatchWorkers):
            self._env.timeout = seconds

    def close(self) -> None:
        """Close the vector env. Subprocess workers get a few seconds to close their envs, then are terminated
        (killed if need be): a dead or stuck worker never makes this hang or raise, and none is left running."""
        if self._env is not None:
            env, self._env = self._env, None
            env.close()  # WatchWorkers.close for subprocess workers: bounded, reaps every worker

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # reopened lazily where it is used
        state["_pending_reset"] = None
        return state

    # -- specs ---------------------------------------------------------------------------------------------
    @property
    def observation_spec(self) -> Composite:
        """``observation`` (the env's own), ``pixels`` (``from_pixels``), or the keys of a Dict space."""
        spec = spec_from_space(self.open()._env.single_observation_space)
        if isinstance(spec, Composite):
            return spec
        return Composite({self._observation_key: spec})

    @property
    def action_spec(self) -> Spec:
        spec = spec_from_space(self.open()._env.single_action_space)
        if isinstance(spec, Composite):
            raise EnvError(f"GymEnv({self.name!r}): Dict action spaces are not supported")
        return spec

    # -- the TensorDict API (see streamrl.envs.base) -------------------------------------------------------
    def _keyed(self, obs: Any) -> dict[str, np.ndarray]:
        if isinstance(obs, dict):
            return {k: np.asarray(v) for k, v in obs.items()}
        return {self._observation_key: np.asarray(obs)}

    def _tensors(self, arrays: dict[str, Any]) -> TensorDict:
        return as_tensordict(arrays, self.batch_size, self.device)

    def _reset(self, mask: torch.Tensor | None) -> TensorDict:
        self.open(same_step=True)
        if mask is None or self._current is None:
            self._current = self._keyed(self.reset_arrays())
        return self._tensors({k: v.copy() for k, v in self._current.items()})

    def _step(self, td: TensorDictBase) -> TensorDict:
        self.open(same_step=True)
        if self._current is None:
            raise EnvError(f"GymEnv({self.name!r}).step called before reset(); call env.reset() first")
        action = td.get("action").detach().cpu().numpy()
        if self._index_ndim is not None and action.ndim > self._index_ndim:  # one-hot actions for a Discrete space
            action = action.argmax(-1)
        step = self.step_arrays(action)
        self._current = self._keyed(step.observation)
        out = self._tensors(self._keyed(step.next_observation))
        n = self.num_envs
        out.set("reward", torch.as_tensor(np.asarray(step.reward, dtype=np.float32)).reshape(n, 1).to(self.device))
        terminated = torch.as_tensor(np.asarray(step.terminated, dtype=bool)).reshape(n, 1).to(self.device)
        truncated = torch.as_tensor(np.asarray(step.truncated, dtype=bool)).reshape(n, 1).to(self.device)
        out.set("terminated", terminated)
        out.set("truncated", truncated)
        out.set("done", terminated | truncated)
        return out

    def set_seed(self, seed: int | None) -> int | None:
        self.seed = seed
        self._current = None
        return seed

    # -- the array API (the env stage's hot path) ----------------------------------------------------------
    def reset_arrays(self, seed: int | None = None) -> Any:
        """Reset every env; the observations as gymnasium gives them (an array, or a dict of arrays)."""
        env = self.open()._env
        seed = self.seed if seed is None else seed
        obs, _ = env.reset(seed=seed)
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)
        return obs if isinstance(obs, dict) else np.asarray(obs)

    def step_arrays(self, actions: np.ndarray) -> VectorStep:
        """Step every env once with ``actions`` (numpy, env batch first)."""
        if self._pending_reset is None:
            raise EnvError(f"GymEnv({self.name!r}).step called before reset(); call env.reset() first")
        result = self._env.step(actions)
        return self._convert(*result)

    def step_async(self, actions: np.ndarray) -> None:
        """Start a step on a subprocess backend; follow with ``await wait_ready()`` and ``step_wait()``."""
        self._env.step_async(actions)

    async def wait_ready(self) -> None:
        """Await until every subprocess worker has answered, without blocking the event loop.

        A worker that dies meanwhile ends the wait too (its pipe reads end-of-file); ``step_wait`` then raises
        :class:`~streamrl.errors.EnvWorkerDied` naming it. A worker shut down earlier (its env raised) raises
        that here at once. See :mod:`streamrl.envs.workers`.
        """
        loop = asyncio.get_running_loop()
        all_pipes = async_vector_env(self._env).parent_pipes  # type: ignore[union-attr]
        pipes = [p for p in all_pipes if p is not None]
        if len(pipes) < len(all_pipes):
            raise_if_workers_died(self._env, self.name)
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
        """Take the workers' answers to ``step_async``.

        A worker that died raises :class:`~streamrl.errors.EnvWorkerDied`, one whose env raised an
        :class:`~streamrl.errors.EnvError` with the original message; both name the env and the worker (the
        vector env is wrapped in :class:`~streamrl.envs.workers.WatchWorkers` when it opens).
        """
        return self._convert(*self._env.step_wait())  # failures translated by WatchWorkers

    @property
    def vector_env(self) -> Any:
        """The gymnasium vector env itself (opened), for stages that record its raw output."""
        return self.open()._env

    @property
    def is_subprocess(self) -> bool:
        return self.open().resolved_backend == "subprocess"

    def _convert(self, obs: Any, reward: Any, terminated: Any, truncated: Any, info: dict[str, Any]) -> VectorStep:
        if isinstance(obs, dict):
            return self._convert_dict(obs, reward, terminated, truncated, info)
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

    def _convert_dict(self, obs: dict[str, Any], reward: Any, terminated: Any, truncated: Any,
                      info: dict[str, Any]) -> VectorStep:
        """``_convert`` for Dict observation spaces (same-step auto-reset backends only)."""
        next_obs = obs
        mask = info.get("_final_obs")
        if mask is not None and mask.any():
            next_obs = {k: np.array(v) for k, v in obs.items()}
            finals = info["final_obs"]
            for i in np.flatnonzero(mask):
                for k in next_obs:
                    next_obs[k][i] = finals[i][k]
        return VectorStep(obs, next_obs, reward, terminated, truncated, None)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        extra = ", from_pixels=True" if self.from_pixels else ""
        return f"GymEnv({self.name!r}, num_envs={self.num_envs}, backend={self.backend!r}{extra})"


class GymWrapper(GymEnv):
    """An env you made yourself (a ``gymnasium.Env`` or a ``gymnasium.vector.VectorEnv``), with our API::

        env = GymWrapper(gym.make("Pendulum-v1", g=9.81))
        env.rollout(100)

    A single env becomes a batch of one (auto-reset on the same step). The wrapped object travels with this one
    when a stage group moves to a worker process, so it must be picklable there.
    """

    def __init__(self, env: Any, *, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        vector = isinstance(env, gym.vector.VectorEnv)
        spec = getattr(env, "spec", None)
        name = spec.id if spec is not None else type(env.unwrapped if not vector else env).__name__
        super().__init__(name, num_envs=env.num_envs if vector else 1, device=device, seed=seed)
        if not vector:
            env = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=AutoresetMode.SAME_STEP)
        self._env = env
        self._adopt("wrapped")

    def open(self, *, same_step: bool = False) -> GymEnv:
        if self._env is None:
            raise EnvError(f"GymWrapper({self.name!r}) was closed; wrap a new env")
        return super().open(same_step=same_step)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _headless_sdl() -> None:
    """Off-screen rendering for pygame-based envs (inherited by subprocess workers; explicit settings win).

    SDL otherwise catches SIGTERM in each worker, so ``terminate()`` cannot stop it and an interpreter that exits
    without closing the env waits on its workers forever; it also looks for a display and sound card it never uses.
    """
    for name, value in (("SDL_NO_SIGNAL_HANDLERS", "1"), ("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy")):
        os.environ.setdefault(name, value)
