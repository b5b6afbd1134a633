"""Transforms of env data and specs, on an env (:class:`TransformedEnv`) or on chunks (:class:`TransformStage`).

::

    from streamrl.transforms import CatFrames, Compose, GrayScale, ObservationNorm, Resize, ToTensorImage
    env = TransformedEnv(GymEnv("CartPole-v1", from_pixels=True, backend="sync"), Compose(
        ToTensorImage(), GrayScale(), Resize(64, 64), CatFrames(4, dim=-3),
        ObservationNorm(in_keys=["pixels"], standard_normal=True)))
    env.transform[-1].init_stats(num_iter=100, reduce_dim=[-1, -2, -4], keep_dims=(-1, -2))

The same names can be imported from :mod:`streamrl.envs`, as TorchRL users write them. Names are imported lazily
(PEP 562): ``import streamrl.transforms`` does not load torch; each name loads its module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

_EXPORTS: dict[str, str] = {
    "CatFrames": "streamrl.transforms.image",
    "CatTensors": "streamrl.transforms.norm",
    "Compose": "streamrl.transforms.base",
    "DoubleToFloat": "streamrl.transforms.norm",
    "FrameSkip": "streamrl.transforms.episode",
    "GrayScale": "streamrl.transforms.image",
    "NoopResetEnv": "streamrl.transforms.episode",
    "ObservationNorm": "streamrl.transforms.norm",
    "Resize": "streamrl.transforms.image",
    "RewardScaling": "streamrl.transforms.norm",
    "RewardSum": "streamrl.transforms.episode",
    "StepCounter": "streamrl.transforms.episode",
    "ToTensorImage": "streamrl.transforms.image",
    "Transform": "streamrl.transforms.base",
    "TransformedEnv": "streamrl.transforms.base",
    "VideoRecorder": "streamrl.transforms.video",
}

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from streamrl.transforms.base import Compose, Transform, TransformedEnv
    from streamrl.transforms.episode import FrameSkip, NoopResetEnv, RewardSum, StepCounter
    from streamrl.transforms.image import CatFrames, GrayScale, Resize, ToTensorImage
    from streamrl.transforms.norm import CatTensors, DoubleToFloat, ObservationNorm, RewardScaling
    from streamrl.transforms.video import VideoRecorder


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
