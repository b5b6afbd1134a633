"""Envs: batches of environments with TorchRL's TensorDict API (reset, step, rollout), and their specs.

::

    from streamrl.envs import Compose, GymEnv, ObservationNorm, StepCounter, TransformedEnv, check_env_specs
    env = TransformedEnv(GymEnv("Pendulum-v1", num_envs=4), Compose(ObservationNorm(in_keys=["observation"]),
                                                                    StepCounter()))
    check_env_specs(env)                      # rolls out a few steps; raises SpecMismatch naming the bad key
    rollout = env.rollout(100)                # TensorDict [4, T]

As in TorchRL, the transforms (:class:`TransformedEnv`, :class:`Compose`, ``ObservationNorm``, ...) can be
imported from here as well as from :mod:`streamrl.transforms`, where they live; they are the same objects.

Names are imported lazily (PEP 562): ``import streamrl.envs`` loads neither torch nor gymnasium, and the
transforms layer (which builds on this one) is imported only when one of its names is first used here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

_TRANSFORMS = "streamrl.transforms"

_EXPORTS: dict[str, str] = {
    "Bounded": "streamrl.envs.specs",
    "CatFrames": _TRANSFORMS,
    "CatTensors": _TRANSFORMS,
    "Categorical": "streamrl.envs.specs",
    "Compose": _TRANSFORMS,
    "Composite": "streamrl.envs.specs",
    "DoubleToFloat": _TRANSFORMS,
    "EnvBase": "streamrl.envs.base",
    "FrameSkip": _TRANSFORMS,
    "GrayScale": _TRANSFORMS,
    "GymEnv": "streamrl.envs.gym",
    "GymWrapper": "streamrl.envs.gym",
    "NoopResetEnv": _TRANSFORMS,
    "ObservationNorm": _TRANSFORMS,
    "OneHot": "streamrl.envs.specs",
    "Resize": _TRANSFORMS,
    "RewardScaling": _TRANSFORMS,
    "RewardSum": _TRANSFORMS,
    "Spec": "streamrl.envs.specs",
    "SpecMismatch": "streamrl.envs.check",
    "StepCounter": _TRANSFORMS,
    "ToTensorImage": _TRANSFORMS,
    "Transform": _TRANSFORMS,
    "TransformedEnv": _TRANSFORMS,
    "Unbounded": "streamrl.envs.specs",
    "VideoRecorder": _TRANSFORMS,
    "check_env_specs": "streamrl.envs.check",
    "spec_from_space": "streamrl.envs.specs",
    "step_mdp": "streamrl.envs.base",
}

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from streamrl.envs.base import EnvBase, step_mdp
    from streamrl.envs.check import SpecMismatch, check_env_specs
    from streamrl.envs.gym import GymEnv, GymWrapper
    from streamrl.envs.specs import Bounded, Categorical, Composite, OneHot, Spec, Unbounded, spec_from_space
    from streamrl.transforms import (
        CatFrames,
        CatTensors,
        Compose,
        DoubleToFloat,
        FrameSkip,
        GrayScale,
        NoopResetEnv,
        ObservationNorm,
        Resize,
        RewardScaling,
        RewardSum,
        StepCounter,
        ToTensorImage,
        Transform,
        TransformedEnv,
        VideoRecorder,
    )


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
