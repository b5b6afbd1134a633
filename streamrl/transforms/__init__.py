"""Transforms of env data and specs, on an env (:class:`TransformedEnv`) or on chunks (:class:`TransformStage`).

::

    from streamrl.transforms import CatFrames, Compose, GrayScale, ObservationNorm, Resize, ToTensorImage
    env = TransformedEnv(GymEnv("CartPole-v1", from_pixels=True, backend="sync"), Compose(
        ToTensorImage(), GrayScale(), Resize(64, 64), CatFrames(4, dim=-3),
        ObservationNorm(in_keys=["pixels"], standard_normal=True)))
    env.transform[-1].init_stats(num_iter=100, reduce_dim=[-1, -2, -4], keep_dims=(-1, -2))
"""

from streamrl.transforms.base import Compose, Transform, TransformedEnv
from streamrl.transforms.episode import FrameSkip, NoopResetEnv, RewardSum, StepCounter
from streamrl.transforms.image import CatFrames, GrayScale, Resize, ToTensorImage
from streamrl.transforms.norm import CatTensors, DoubleToFloat, ObservationNorm, RewardScaling
from streamrl.transforms.video import VideoRecorder

__all__ = [
    "CatFrames",
    "CatTensors",
    "Compose",
    "DoubleToFloat",
    "FrameSkip",
    "GrayScale",
    "NoopResetEnv",
    "ObservationNorm",
    "Resize",
    "RewardScaling",
    "RewardSum",
    "StepCounter",
    "ToTensorImage",
    "Transform",
    "TransformedEnv",
    "VideoRecorder",
]
