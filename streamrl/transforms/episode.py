"""Episode transforms: ``StepCounter``, ``RewardSum``, ``NoopResetEnv``, ``FrameSkip``.

::

    env = TransformedEnv(GymEnv("CartPole-v1", num_envs=4, backend="sync"), Compose(
        NoopResetEnv(noops=30),        # 1..30 no-op steps after every reset (inside each gymnasium env)
        FrameSkip(2),                  # every action repeated twice, rewards summed (inside each gymnasium env)
        StepCounter(max_steps=200),    # step_count [.., 1]; truncated/done at 200 steps
        RewardSum(),                   # episode_reward [.., 1]: the return so far
    ))

``StepCounter`` and ``RewardSum`` keep one counter per env, reset on the envs a reset touches. On chunks
(``forward``/``forward_chunk``) they count from each episode's start, as ``CatFrames`` does.

``NoopResetEnv`` and ``FrameSkip`` cannot be done on a vector env from the outside: a gymnasium vector env steps
all its envs at once, so one env cannot be stepped alone after its reset, and repeating an action across the
batch would step envs whose episode ended on the way. Both therefore add a wrapper to the base :class:`GymEnv`
(:class:`~streamrl.envs.wrappers.NoopReset`, :class:`~streamrl.envs.wrappers.SkipFrames`, with
``GymEnv.add_wrapper``: in every env, innermost first in the order the transforms join) and need a GymEnv that is
not open yet. For the same reason ``StepCounter(max_steps)`` on a GymEnv also adds
:class:`~streamrl.envs.wrappers.StepLimit` (``max_steps`` steps, counted above the frame skips added before it), so
that the env really resets when the counter truncates. Without a transform in sight::

    GymEnv("CartPole-v1", num_envs=4, backend="sync", wrappers=[NoopReset(30), SkipFrames(2), StepLimit(200)])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from tensordict import TensorDictBase

from streamrl.envs.gym import GymEnv
from streamrl.envs.specs import Bounded, Composite, Unbounded
from streamrl.envs.wrappers import EnvWrapper, NoopReset, SkipFrames, StepLimit
from streamrl.errors import ConfigError, EnvError
from streamrl.transforms._chunks import ends_open, episode_starts, segment_cumsum
from streamrl.transforms.base import Transform, TransformedEnv


def _wrap_gym_envs(transform: Transform, env: TransformedEnv, wrapper: EnvWrapper, *, required: bool = True) -> None:
    """Add ``wrapper`` (once) to the GymEnv under ``env``, for ``transform``; a base env of another kind is an
    error if ``required``."""
    base = env.innermost()
    if transform.__dict__.get("_wrapped") is base:
        return
    if not isinstance(base, GymEnv):
        if required:
            raise EnvError(f"{transform!r} configures the gymnasium envs inside a GymEnv; the base env is {base!r}")
        return
    if base.is_open:
        raise EnvError(f"{transform!r} must join the env before its GymEnv opens (it sets a gymnasium wrapper), but "
                       f"{base!r} is already open; build TransformedEnv(GymEnv(...), {transform!r}) before using "
                       "the env")
    base.add_wrapper(wrapper)
    transform.__dict__["_wrapped"] = base  # not a submodule, not in the state dict


class _PerEnv(Transform, ABC):
    """A running per-env value (``[*batch, 1]``) reset on masked rows; see StepCounter and RewardSum."""

    dtype: torch.dtype

    def __init__(self, in_keys: Sequence[str], out_keys: Sequence[str]) -> None:
        super().__init__(in_keys, out_keys)
        self._value: torch.Tensor | None = None
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None  # forward_chunk: (running value, open)

    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        shape = (*td.batch_size, 1)
        value = self._value
        if mask is None or value is None or value.shape != shape:
            value = torch.zeros(shape, dtype=self.dtype, device=td.device)
        else:
            value = value.clone()
            value[mask.reshape(td.batch_size).to(value.device)] = 0
        self._value = value
        td.set(self.out_keys[0], value)
        return td

    @abstractmethod
    def _increment(self, next_td: TensorDictBase) -> torch.Tensor:
        """``[*batch, 1]``: what one env step adds (1 for a step, its reward)."""

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        if self._value is None:
            raise RuntimeError(f"{type(self).__name__}: the env was stepped before a reset; call env.reset() first")
        self._value = self._value + self._increment(next_td).to(self.dtype)
        next_td.set(self.out_keys[0], self._value)
        return next_td

    @abstractmethod
    def _per_row(self, td: TensorDictBase) -> torch.Tensor:
        """``[B, T]``: what each row of a chunk adds (1 for a step, its reward)."""

    def _chunk(self, td: TensorDictBase, *, carry: bool) -> TensorDictBase:
        batch = td.batch_size
        T = batch[-1] if len(batch) else 0
        B = batch.numel() // max(T, 1)
        prev = self._carry if carry else None
        if prev is not None and prev[0].shape[0] != B:
            prev = None
        cont = prev[1] if prev is not None else None
        running = prev[0] if prev is not None else torch.zeros(B, dtype=torch.float64, device=td.device)
        starts = episode_starts(td, cont)
        added = self._per_row(td).reshape(B, T).to(torch.float64)
        after = segment_cumsum(added, starts, running)
        before = after - added
        td.set(self.out_keys[0], before.to(self.dtype).reshape(*batch, 1))
        if "next" in td.keys():
            td.set(("next", self.out_keys[0]), after.to(self.dtype).reshape(*batch, 1))
        if carry:
            self._carry = (after[:, -1], ends_open(td))
        return td

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        return self._chunk(td, carry=False)

    def forward_chunk(self, td: TensorDictBase) -> TensorDictBase:
        return self._chunk(td, carry=True)


class StepCounter(_PerEnv):
    """``step_count`` ``[.., 1]`` int64: 0 after a reset, +1 per step. With ``max_steps`` a step that reaches it
    sets ``truncated`` and ``done`` (see the module docstring for GymEnv)."""

    dtype = torch.int64

    def __init__(self, max_steps: int | None = None, step_count_key: str = "step_count") -> None:
        super().__init__((), ())
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"StepCounter: max_steps must be >= 1 or None, got {max_steps}")
        self.out_keys = [step_count_key]
        self.max_steps = max_steps

    def _attached(self, env: TransformedEnv) -> None:
        if self.max_steps is not None:
            _wrap_gym_envs(self, env, StepLimit(self.max_steps), required=False)

    def _increment(self, next_td: TensorDictBase) -> torch.Tensor:
        return torch.ones((*next_td.batch_size, 1), dtype=torch.int64, device=next_td.device)

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        next_td = super()._step(td, next_td)
        if self.max_steps is not None and self._value is not None:
            hit = self._value >= self.max_steps
            for key in ("truncated", "done"):
                if key in next_td.keys():
                    next_td.set(key, next_td.get(key) | hit)
        return next_td

    def _per_row(self, td: TensorDictBase) -> torch.Tensor:
        return torch.ones(td.batch_size, dtype=torch.float64, device=td.device)

    def transform_observation_spec(self, spec: Composite) -> Composite:
        out = Composite(dict(spec.specs))
        if self.max_steps is None:
            out[self.out_keys[0]] = Unbounded(shape=(1,), dtype=torch.int64)
        else:
            out[self.out_keys[0]] = Bounded(shape=(1,), dtype=torch.int64, low=0, high=self.max_steps)
        return out

    def __repr__(self) -> str:
        return f"StepCounter(max_steps={self.max_steps})"


class RewardSum(_PerEnv):
    """``episode_reward`` ``[.., 1]``: the sum of the episode's rewards so far (0 after a reset)."""

    dtype = torch.float32

    def __init__(self, in_keys: Sequence[str] = ("reward",), out_keys: Sequence[str] = ("episode_reward",)) -> None:
        super().__init__(in_keys, out_keys)
        if len(self.in_keys) != 1:
            raise ConfigError(f"RewardSum sums one reward entry, got in_keys={self.in_keys}")

    def _increment(self, next_td: TensorDictBase) -> torch.Tensor:
        return next_td.get(self.in_keys[0])

    def _per_row(self, td: TensorDictBase) -> torch.Tensor:
        return td.get(("next", self.in_keys[0]))

    def transform_observation_spec(self, spec: Composite) -> Composite:
        out = Composite(dict(spec.specs))
        out[self.out_keys[0]] = Unbounded(shape=(1,), dtype=self.dtype)
        return out


class NoopResetEnv(Transform):
    """After every reset, 1 to ``noops`` (uniformly drawn) no-op steps; runs inside each gymnasium env."""

    def __init__(self, noops: int = 30, random: bool = True) -> None:
        super().__init__()
        if noops < 1:
            raise ConfigError(f"NoopResetEnv: noops must be >= 1, got {noops}")
        if not random:
            raise ConfigError("NoopResetEnv: only random=True (1..noops no-ops per reset) is supported")
        self.noops = noops
        self.random = random

    def _attached(self, env: TransformedEnv) -> None:
        _wrap_gym_envs(self, env, NoopReset(self.noops))

    def __repr__(self) -> str:
        return f"NoopResetEnv(noops={self.noops}, random={self.random})"


class FrameSkip(Transform):
    """Repeat every action ``frame_skip`` times, summing rewards and stopping at an episode end; runs inside each
    gymnasium env (it adds ``SkipFrames(frame_skip)`` to the base GymEnv's wrappers)."""

    def __init__(self, frame_skip: int = 1) -> None:
        super().__init__()
        if frame_skip < 1:
            raise ConfigError(f"FrameSkip: frame_skip must be >= 1, got {frame_skip}")
        self.frame_skip = frame_skip

    def _attached(self, env: TransformedEnv) -> None:
        _wrap_gym_envs(self, env, SkipFrames(self.frame_skip))

    def __repr__(self) -> str:
        return f"FrameSkip(frame_skip={self.frame_skip})"

