"""Transforms and the env that applies them: :class:`Transform`, :class:`Compose`, :class:`TransformedEnv`.

::

    env = TransformedEnv(GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend="sync"),
                         Compose(ToTensorImage(), GrayScale(), Resize(64, 64)))
    env.append_transform(CatFrames(4, dim=-3))
    env.observation_spec["pixels"]          # Bounded float32 (4, 64, 64) in [0, 1]: the specs are transformed too
    td = env.rollout(10)                      # pixels [2, 10, 4, 64, 64]
    chunk = env.transform(chunk)              # the same transforms on a batch that is not an env step

A transform declares ``in_keys`` (what it reads) and ``out_keys`` (what it writes, by default the same) and
transforms both the data and the specs, so that the specs of a :class:`TransformedEnv` describe exactly what its
steps hold. The hooks, all optional:

* ``_apply_transform(x)``: the stateless per-entry work; ``_call(td)`` applies it to every ``in_key`` present.
* ``_reset(td, mask)``: after the parent env reset the envs in ``mask`` (bool ``[num_envs]``; None: all).
  Stateful transforms reset their per-env state on the masked rows only. Default: ``_call(td)``.
* ``_step(td, next_td)``: on every env step, ``td`` the root, ``next_td`` what the step led to. Default:
  ``_call(next_td)``.
* ``forward(td)``: batched data that is not an env step (chunks ``[num_envs, T]``, replay batches): the root
  and the ``next`` entries. ``forward_chunk(td)``: consecutive chunks of the same envs; stateful transforms
  (``CatFrames``, ``StepCounter``, ``RewardSum``) carry their state from one chunk to the next.
* ``transform_observation_spec`` / ``transform_reward_spec`` / ``transform_action_spec`` /
  ``transform_done_spec``. The default maps each ``in_key``'s spec through ``_apply_transform`` (bounds
  included), so a stateless transform gets a matching spec for free.

Actions are passed to the base env untransformed (no inverse transforms).

Where they run: in a :class:`TransformedEnv`, in the process that steps the env (the env stage's); observation
transforms (``observation_only``: ``ToTensorImage``, ``GrayScale``, ``Resize``, ``CatFrames``, ``ObservationNorm``,
``DoubleToFloat``, ``CatTensors``) can instead run inside each env, where it steps:
``GymEnv(..., worker_transform=Compose(...))`` (see :mod:`streamrl.envs.wrappers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from tensordict import TensorDictBase

from streamrl.envs.base import EnvBase
from streamrl.envs.specs import Bounded, Composite, Spec, Unbounded
from streamrl.errors import ConfigError


class Transform(torch.nn.Module):
    """Base class of transforms; see the module docstring."""

    observation_only: ClassVar[bool] = False
    """True when it reads and writes observation entries only, one env at a time (per-env state, if any, restarts
    on that env's reset): such a transform can run inside the env workers (``GymEnv(worker_transform=...)``)."""

    def __init__(self, in_keys: Sequence[str] = (), out_keys: Sequence[str] | None = None) -> None:
        super().__init__()
        if isinstance(in_keys, str) or isinstance(out_keys, str):
            raise TypeError(f"{type(self).__name__}: in_keys/out_keys are sequences of keys, e.g. in_keys=['pixels'],"
                            f" got {in_keys=}, {out_keys=}")
        self.in_keys = list(in_keys)
        self.out_keys = list(self.in_keys if out_keys is None else out_keys)
        if len(self.in_keys) != len(self.out_keys):
            raise ConfigError(f"{type(self).__name__}: in_keys and out_keys need the same length, got "
                              f"{self.in_keys=}, {self.out_keys=}")
        self.__dict__["_container"] = None  # a Compose or a TransformedEnv; not a submodule (no cycle)

    # -- data ----------------------------------------------------------------------------------------------
    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _call(self, td: TensorDictBase) -> TensorDictBase:
        keys = set(td.keys())
        for in_key, out_key in zip(self.in_keys, self.out_keys, strict=True):
            if in_key in keys:
                td.set(out_key, self._apply_transform(td.get(in_key)))
        return td

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        """Transform a batch that is not an env step: its root and its ``next`` entries (in place)."""
        td = self._call(td)
        if "next" in td.keys():
            td.set("next", self._call(td.get("next")))
        return td

    def forward_chunk(self, td: TensorDictBase) -> TensorDictBase:
        """Transform the next chunk ``[num_envs, T]`` of a stream; stateful transforms carry state across."""
        return self.forward(td)

    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        return self._call(td)

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        return self._call(next_td)

    def close(self) -> None:
        """Called when the env closes (flush files)."""

    def runs_in_env_workers(self) -> bool:
        """Whether ``GymEnv(worker_transform=...)`` can run it inside each env (see ``observation_only``)."""
        return self.observation_only

    # -- specs ---------------------------------------------------------------------------------------------
    def _transform_spec(self, spec: Spec) -> Spec:
        """The spec of ``_apply_transform``'s output: the bounds mapped through it (monotone transforms)."""
        if isinstance(spec, Bounded):
            low, high = self._apply_transform(spec.low.clone()), self._apply_transform(spec.high.clone())
            return Bounded(shape=low.shape, dtype=low.dtype, device=spec.device, low=torch.minimum(low, high),
                           high=torch.maximum(low, high))
        if isinstance(spec, Unbounded):
            zero = self._apply_transform(spec.zero())
            return Unbounded(shape=zero.shape, dtype=zero.dtype, device=spec.device)
        raise TypeError(f"{type(self).__name__} cannot transform a {type(spec).__name__} spec; "
                        "it handles Bounded and Unbounded entries")

    def transform_observation_spec(self, spec: Composite) -> Composite:
        out = Composite(dict(spec.specs))
        for in_key, out_key in zip(self.in_keys, self.out_keys, strict=True):
            if in_key in spec:
                leaf = spec[in_key]
                assert isinstance(leaf, Spec), f"{in_key!r} is a Composite; transforms read leaf entries"
                out[out_key] = self._transform_spec(leaf)
        return out

    def transform_reward_spec(self, spec: Spec) -> Spec:
        return spec

    def transform_action_spec(self, spec: Spec) -> Spec:
        return spec

    def transform_done_spec(self, spec: Composite) -> Composite:
        return spec

    # -- where it sits -------------------------------------------------------------------------------------
    def _set_container(self, container: Compose | TransformedEnv | None) -> None:
        current = self.__dict__["_container"]
        if container is not None and current is not None and current is not container:
            raise ConfigError(f"{self!r} already belongs to another Compose or env; make a new transform instead")
        self.__dict__["_container"] = container

    @property
    def container(self) -> Compose | TransformedEnv | None:
        return self.__dict__["_container"]  # type: ignore[no-any-return]

    @property
    def parent(self) -> TransformedEnv | None:
        """The env as this transform sees it: the base env and the transforms *before* this one (a view)."""
        container = self.container
        if not isinstance(container, Compose):
            return None
        before = container._items()[: container.index(self)]
        if isinstance(container.container, TransformedEnv):
            env: EnvBase = container.container.base_env
        else:
            parent = container.parent
            if parent is None:
                return None
            env = parent
        return TransformedEnv(env, Compose(*before, _adopt=False), _adopt=False)

    def _attached(self, env: TransformedEnv) -> None:
        """Called when the transform joins ``env`` (configures the base env for FrameSkip, NoopResetEnv...)."""

    def __repr__(self) -> str:
        keys = f"in_keys={self.in_keys}" + (f", out_keys={self.out_keys}" if self.out_keys != self.in_keys else "")
        return f"{type(self).__name__}({keys})"


class Compose(Transform):
    """Transforms applied in order; indexable (``env.transform[-1]``), with ``append`` and ``insert``."""

    def __init__(self, *transforms: Transform, _adopt: bool = True) -> None:
        super().__init__()
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Compose takes Transform objects, got {t!r}")
        self.transforms = torch.nn.ModuleList(transforms)
        if _adopt:
            for t in transforms:
                t._set_container(self)

    def _items(self) -> list[Transform]:
        return list(self.transforms)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Transform:
        return self._items()[index]

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self._items())

    def index(self, transform: Transform) -> int:
        for i, t in enumerate(self._items()):
            if t is transform:
                return i
        raise ValueError(f"{transform!r} is not in this Compose")

    def append(self, transform: Transform) -> Compose:
        return self.insert(len(self.transforms), transform)

    def insert(self, index: int, transform: Transform) -> Compose:
        """Insert ``transform`` at ``index`` (negative indices count from the end, as ``list.insert``)."""
        if not isinstance(transform, Transform):
            raise TypeError(f"Compose takes Transform objects, got {transform!r}")
        transform._set_container(self)
        items = list(self.transforms)
        items.insert(index, transform)
        self.transforms = torch.nn.ModuleList(items)
        env = self._env()
        if env is not None:
            _attach_all(transform, env)
        return self

    def _env(self) -> TransformedEnv | None:
        container = self.container
        while isinstance(container, Compose):
            container = container.container
        return container

    def _call(self, td: TensorDictBase) -> TensorDictBase:
        for t in self._items():
            td = t._call(td)
        return td

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        for t in self._items():
            td = t(td)
        return td

    def forward_chunk(self, td: TensorDictBase) -> TensorDictBase:
        for t in self._items():
            td = t.forward_chunk(td)
        return td

    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        for t in self._items():
            td = t._reset(td, mask)
        return td

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        for t in self._items():
            next_td = t._step(td, next_td)
        return next_td

    def close(self) -> None:
        for t in self._items():
            t.close()

    def runs_in_env_workers(self) -> bool:
        return all(t.runs_in_env_workers() for t in self._items())

    def transform_observation_spec(self, spec: Composite) -> Composite:
        for t in self._items():
            spec = t.transform_observation_spec(spec)
        return spec

    def transform_reward_spec(self, spec: Spec) -> Spec:
        for t in self._items():
            spec = t.transform_reward_spec(spec)
        return spec

    def transform_action_spec(self, spec: Spec) -> Spec:
        for t in self._items():
            spec = t.transform_action_spec(spec)
        return spec

    def transform_done_spec(self, spec: Composite) -> Composite:
        for t in self._items():
            spec = t.transform_done_spec(spec)
        return spec

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose(\n    {inner})" if inner else "Compose()"


def _attach_all(transform: Transform, env: TransformedEnv) -> None:
    transform._attached(env)
    if isinstance(transform, Compose):
        for t in transform:
            _attach_all(t, env)


class TransformedEnv(EnvBase):
    """``base_env`` seen through ``transform`` (data and specs); see the module docstring."""

    def __init__(self, base_env: EnvBase, transform: Transform | None = None, *, _adopt: bool = True) -> None:
        if not isinstance(base_env, EnvBase):
            raise TypeError(f"TransformedEnv wraps an EnvBase (GymEnv, TransformedEnv...), got {base_env!r}")
        self.base_env = base_env
        self.num_envs, self.batch_size, self.device = base_env.num_envs, base_env.batch_size, base_env.device
        if transform is None:
            transform = Compose()
        elif not isinstance(transform, Compose):
            transform = Compose(transform, _adopt=_adopt)
        self._transform = transform
        if _adopt:
            transform._set_container(self)
            _attach_all(transform, self)

    @property
    def transform(self) -> Compose:
        """The transforms, in order (a :class:`Compose`; ``env.transform[i]`` is the i-th)."""
        return self._transform

    def append_transform(self, transform: Transform) -> TransformedEnv:
        self._transform.append(transform)
        return self

    def insert_transform(self, index: int, transform: Transform) -> TransformedEnv:
        self._transform.insert(index, transform)
        return self

    @property
    def seed(self) -> int | None:
        return self.base_env.seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self.base_env.set_seed(value)

    def set_seed(self, seed: int | None) -> int | None:
        return self.base_env.set_seed(seed)

    def innermost(self) -> EnvBase:
        """The env under every TransformedEnv layer (a :class:`GymEnv`, usually)."""
        env = self.base_env
        while isinstance(env, TransformedEnv):
            env = env.base_env
        return env

    # -- specs and steps -----------------------------------------------------------------------------------
    @property
    def observation_spec(self) -> Composite:
        return self._transform.transform_observation_spec(self.base_env.observation_spec)

    @property
    def action_spec(self) -> Spec:
        return self._transform.transform_action_spec(self.base_env.action_spec)

    @property
    def reward_spec(self) -> Spec:
        return self._transform.transform_reward_spec(self.base_env.reward_spec)

    @property
    def done_spec(self) -> Composite:
        return self._transform.transform_done_spec(self.base_env.done_spec)

    def _reset(self, mask: torch.Tensor | None) -> TensorDictBase:
        return self._transform._reset(self.base_env._reset(mask), mask)

    def _step(self, td: TensorDictBase) -> TensorDictBase:
        return self._transform._step(td, self.base_env._step(td))

    def close(self) -> None:
        self._transform.close()
        self.base_env.close()

    def __repr__(self) -> str:
        return f"TransformedEnv(env={self.base_env!r}, transform={self._transform!r})"
