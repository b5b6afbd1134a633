"""``check_env_specs``: does what an env produces agree with what its specs promise?

::

    env = TransformedEnv(GymEnv("CartPole-v1", from_pixels=True), Compose(ToTensorImage(), GrayScale()))
    check_env_specs(env)      # raises SpecMismatch naming the first key that disagrees

It rolls the env out for a few steps (random actions, auto-reset on) and checks every entry of the rollout,
root and ``next``, against its spec: the trailing shape, the dtype and the bounds. It also checks that the
rollout holds exactly the keys that ``fake_tensordict()`` (made from the specs) holds, so a transform that writes
an entry its spec does not declare, or declares one it never writes, is caught too.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase

from streamrl.envs.base import EnvBase
from streamrl.envs.specs import Bounded, Categorical, Composite, OneHot, Spec
from streamrl.errors import EnvError


class SpecMismatch(EnvError):
    """An env's output disagrees with its specs; the message names the key."""


def _leaves(spec: Spec | Composite, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Spec]]:
    if isinstance(spec, Composite):
        out: list[tuple[tuple[str, ...], Spec]] = []
        for key, sub in spec.items():
            out.extend(_leaves(sub, (*prefix, key)))
        return out
    return [(prefix, spec)]


def _check_value(name: str, spec: Spec, value: torch.Tensor, batch_dims: int) -> None:
    shape = tuple(value.shape[batch_dims:])
    if shape != tuple(spec.shape):
        raise SpecMismatch(f"key {name!r}: shape {shape} (after the batch dims), but the spec says {tuple(spec.shape)}")
    if value.dtype != spec.dtype:
        raise SpecMismatch(f"key {name!r}: dtype {value.dtype}, but the spec says {spec.dtype}")
    if isinstance(spec, Bounded):
        low_ok = bool((value >= spec.low.to(value.device)).all())
        high_ok = bool((value <= spec.high.to(value.device)).all())
        if not (low_ok and high_ok):
            lo, hi = value.min().item(), value.max().item()
            raise SpecMismatch(f"key {name!r}: values in [{lo}, {hi}] leave the spec's bounds {spec!r}")
    elif isinstance(spec, Categorical | OneHot) and not spec.is_in(value):
        raise SpecMismatch(f"key {name!r}: values outside the spec {spec!r}")


def _key_name(key: Any) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)


def check_env_specs(env: EnvBase, steps: int = 8, seed: int | None = 0) -> TensorDictBase:
    """Roll ``env`` out ``steps`` steps and check every entry against the specs; returns the rollout.

    Raises :class:`SpecMismatch` naming the first key whose shape, dtype or bounds disagree, or a key that is
    in the rollout but not in the specs (or the other way round).
    """
    if seed is not None:
        env.set_seed(seed)
    rollout = env.rollout(steps, break_when_any_done=False)
    batch_dims = rollout.batch_dims
    observation = env.observation_spec
    checks: list[tuple[tuple[str, ...], Spec]] = []
    for path, spec in _leaves(observation) + _leaves(env.done_spec):
        checks += [(("next", *path), spec), (path, spec)]  # a step's output first: roots are copied from it
    checks += [(("action",), env.action_spec), (("next", "reward"), env.reward_spec)]
    for path, spec in checks:
        key = path if len(path) > 1 else path[0]
        if key not in rollout.keys(include_nested=True):
            raise SpecMismatch(f"key {_key_name(key)!r} is in the specs but the env did not write it")
        _check_value(_key_name(key), spec, rollout.get(key), batch_dims)
    expected = set(env.fake_tensordict().keys(include_nested=True, leaves_only=True))
    produced = set(rollout.keys(include_nested=True, leaves_only=True))
    extra = sorted(_key_name(k) for k in produced - expected)
    if extra:
        raise SpecMismatch(f"key {extra[0]!r} is written by the env but no spec declares it "
                           "(a transform should add it to the observation spec)")
    return rollout
