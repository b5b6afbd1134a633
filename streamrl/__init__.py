"""streamrl: reinforcement learning as a streaming dataflow.

A training run is a :class:`Pipeline` of async stages (env stepping, policy inference, replay, learning) joined
by bounded streams; hooks subscribe to the events the stages publish. ``streamrl.run(pipeline, run_dir)`` runs
one; ``streamrl run pipeline.py`` does the same from the command line.

Names are imported lazily (on first use), so ``import streamrl`` and the command line start fast and worker
processes can be prepared before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "A2CLoss": "streamrl.objectives.ppo",
    "Actor": "streamrl.modules.actors",
    "AdditiveGaussianModule": "streamrl.modules.exploration",
    "AdvantageStage": "streamrl.stages.advantage",
    "Bounded": "streamrl.envs.specs",
    "BrokenStreamError": "streamrl.errors",
    "CatFrames": "streamrl.transforms.image",
    "CatTensors": "streamrl.transforms.norm",
    "Categorical": "streamrl.envs.specs",
    "Checkpoint": "streamrl.hooks.checkpoint",
    "CheckpointError": "streamrl.errors",
    "ClipPPOLoss": "streamrl.objectives.ppo",
    "ClosedStreamError": "streamrl.errors",
    "Compose": "streamrl.transforms.base",
    "Composite": "streamrl.envs.specs",
    "ConfigError": "streamrl.errors",
    "ConvNet": "streamrl.modules.nets",
    "DDPGLoss": "streamrl.objectives.actor_critic",
    "DQNLoss": "streamrl.objectives.dqn",
    "DiskFull": "streamrl.errors",
    "DoubleToFloat": "streamrl.transforms.norm",
    "DuelingCnnDQNet": "streamrl.modules.nets",
    "EGreedyModule": "streamrl.modules.exploration",
    "EndOfStream": "streamrl.errors",
    "EnvError": "streamrl.errors",
    "EnvStage": "streamrl.stages.env",
    "Epochs": "streamrl.stages.learner",
    "EpsilonAnnealing": "streamrl.hooks.schedules",
    "Evaluate": "streamrl.hooks.eval",
    "Event": "streamrl.events",
    "EventBus": "streamrl.events",
    "EventLog": "streamrl.hooks.logging",
    "EveryBatch": "streamrl.stages.learner",
    "FifoSampler": "streamrl.replay.samplers",
    "FrameNorm": "streamrl.modules.nets",
    "FrameSkip": "streamrl.transforms.episode",
    "GAE": "streamrl.objectives.value",
    "GrayScale": "streamrl.transforms.image",
    "GymEnv": "streamrl.envs.gym",
    "HardUpdate": "streamrl.objectives.updaters",
    "Hook": "streamrl.events",
    "IndependentNormal": "streamrl.modules.distributions",
    "LearnerStage": "streamrl.stages.learner",
    "LossKeys": "streamrl.objectives.ppo",
    "MLP": "streamrl.modules.nets",
    "MetricsCSV": "streamrl.hooks.logging",
    "NonFiniteError": "streamrl.errors",
    "NoopResetEnv": "streamrl.transforms.episode",
    "NormalParamExtractor": "tensordict.nn",
    "ObservationNorm": "streamrl.transforms.norm",
    "OneHot": "streamrl.envs.specs",
    "OrnsteinUhlenbeckModule": "streamrl.modules.exploration",
    "Pipeline": "streamrl.pipeline",
    "PipelineError": "streamrl.errors",
    "PipelineFileError": "streamrl.errors",
    "PolicyAnswer": "streamrl.stages.policy",
    "PolicyRequest": "streamrl.stages.policy",
    "PolicyStage": "streamrl.stages.policy",
    "PrioritizedSampler": "streamrl.replay.samplers",
    "PriorityUpdate": "streamrl.hooks.priority",
    "ProbabilisticActor": "streamrl.modules.actors",
    "ProgressBar": "streamrl.hooks.progress",
    "QValueActor": "streamrl.modules.actors",
    "RamStorage": "streamrl.replay.storage",
    "RateLimiter": "streamrl.replay.ratelimit",
    "ReceiveStream": "streamrl.streams",
    "ReinforceLoss": "streamrl.objectives.ppo",
    "RemoteError": "streamrl.errors",
    "ReplayBuffer": "streamrl.replay.buffer",
    "Resize": "streamrl.transforms.image",
    "RewardScaling": "streamrl.transforms.norm",
    "RewardSum": "streamrl.transforms.episode",
    "RunContext": "streamrl.execution.context",
    "RunDirError": "streamrl.errors",
    "RunResult": "streamrl.execution.main",
    "SACLoss": "streamrl.objectives.actor_critic",
    "SamplerStage": "streamrl.stages.replay",
    "SamplerWithoutReplacement": "streamrl.replay.samplers",
    "SendStream": "streamrl.streams",
    "SliceSampler": "streamrl.replay.samplers",
    "SoftUpdate": "streamrl.objectives.updaters",
    "Spec": "streamrl.envs.specs",
    "Stage": "streamrl.stages.base",
    "StageContext": "streamrl.stages.base",
    "StageFailed": "streamrl.errors",
    "StepCounter": "streamrl.transforms.episode",
    "StoreError": "streamrl.errors",
    "StreamError": "streamrl.errors",
    "StreamRLError": "streamrl.errors",
    "StreamStatistics": "streamrl.streams",
    "SumTree": "streamrl.replay.sumtree",
    "TD0Estimator": "streamrl.objectives.value",
    "TD1Estimator": "streamrl.objectives.value",
    "TD3Loss": "streamrl.objectives.actor_critic",
    "TDLambdaEstimator": "streamrl.objectives.value",
    "TanhNormal": "streamrl.modules.distributions",
    "ToTensorImage": "streamrl.transforms.image",
    "Transform": "streamrl.transforms.base",
    "TransformStage": "streamrl.stages.transform",
    "TransformedEnv": "streamrl.transforms.base",
    "Unbounded": "streamrl.envs.specs",
    "UniformSampler": "streamrl.replay.samplers",
    "ValueEstimator": "streamrl.objectives.value",
    "ValueKeys": "streamrl.objectives.value",
    "ValueOperator": "streamrl.modules.actors",
    "VideoRecorder": "streamrl.transforms.video",
    "WorkerDied": "streamrl.errors",
    "WouldBlock": "streamrl.errors",
    "WriterStage": "streamrl.stages.replay",
    "ZarrStorage": "streamrl.replay.zarr_store",
    "evaluate": "streamrl.hooks.eval",
    "gae": "streamrl.objectives.value",
    "open_exchange": "streamrl.exchange",
    "open_stream": "streamrl.streams",
    "run": "streamrl.execution.main",
    "spec_from_space": "streamrl.envs.specs",
    "td0_return": "streamrl.objectives.value",
    "td1_return": "streamrl.objectives.value",
    "td_lambda_return": "streamrl.objectives.value",
}

if TYPE_CHECKING:
    from tensordict.nn import NormalParamExtractor

    from streamrl.envs.gym import GymEnv
    from streamrl.envs.specs import Bounded, Categorical, Composite, OneHot, Spec, Unbounded, spec_from_space
    from streamrl.errors import (
        BrokenStreamError,
        CheckpointError,
        ClosedStreamError,
        ConfigError,
        DiskFull,
        EndOfStream,
        EnvError,
        NonFiniteError,
        PipelineError,
        PipelineFileError,
        RemoteError,
        RunDirError,
        StageFailed,
        StoreError,
        StreamError,
        StreamRLError,
        WorkerDied,
        WouldBlock,
    )
    from streamrl.events import Event, EventBus, Hook
    from streamrl.exchange import open_exchange
    from streamrl.execution.context import RunContext
    from streamrl.execution.main import RunResult, run
    from streamrl.hooks.checkpoint import Checkpoint
    from streamrl.hooks.eval import Evaluate, evaluate
    from streamrl.hooks.logging import EventLog, MetricsCSV
    from streamrl.hooks.priority import PriorityUpdate
    from streamrl.hooks.progress import ProgressBar
    from streamrl.hooks.schedules import EpsilonAnnealing
    from streamrl.modules.actors import Actor, ProbabilisticActor, QValueActor, ValueOperator
    from streamrl.modules.distributions import IndependentNormal, TanhNormal
    from streamrl.modules.exploration import AdditiveGaussianModule, EGreedyModule, OrnsteinUhlenbeckModule
    from streamrl.modules.nets import MLP, ConvNet, DuelingCnnDQNet, FrameNorm
    from streamrl.objectives.actor_critic import DDPGLoss, SACLoss, TD3Loss
    from streamrl.objectives.dqn import DQNLoss
    from streamrl.objectives.ppo import A2CLoss, ClipPPOLoss, LossKeys, ReinforceLoss
    from streamrl.objectives.updaters import HardUpdate, SoftUpdate
    from streamrl.objectives.value import (
        GAE,
        TD0Estimator,
        TD1Estimator,
        TDLambdaEstimator,
        ValueEstimator,
        ValueKeys,
        gae,
        td0_return,
        td1_return,
        td_lambda_return,
    )
    from streamrl.pipeline import Pipeline
    from streamrl.replay.buffer import ReplayBuffer
    from streamrl.replay.ratelimit import RateLimiter
    from streamrl.replay.samplers import (
        FifoSampler,
        PrioritizedSampler,
        SamplerWithoutReplacement,
        SliceSampler,
        UniformSampler,
    )
    from streamrl.replay.storage import RamStorage
    from streamrl.replay.sumtree import SumTree
    from streamrl.replay.zarr_store import ZarrStorage
    from streamrl.stages.advantage import AdvantageStage
    from streamrl.stages.base import Stage, StageContext
    from streamrl.stages.env import EnvStage
    from streamrl.stages.learner import Epochs, EveryBatch, LearnerStage
    from streamrl.stages.policy import PolicyAnswer, PolicyRequest, PolicyStage
    from streamrl.stages.replay import SamplerStage, WriterStage
    from streamrl.stages.transform import TransformStage
    from streamrl.streams import ReceiveStream, SendStream, StreamStatistics, open_stream
    from streamrl.transforms.base import Compose, Transform, TransformedEnv
    from streamrl.transforms.episode import FrameSkip, NoopResetEnv, RewardSum, StepCounter
    from streamrl.transforms.image import CatFrames, GrayScale, Resize, ToTensorImage
    from streamrl.transforms.norm import CatTensors, DoubleToFloat, ObservationNorm, RewardScaling
    from streamrl.transforms.video import VideoRecorder


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamrl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "A2CLoss",
    "Actor",
    "AdditiveGaussianModule",
    "AdvantageStage",
    "Bounded",
    "BrokenStreamError",
    "CatFrames",
    "CatTensors",
    "Categorical",
    "Checkpoint",
    "CheckpointError",
    "ClipPPOLoss",
    "ClosedStreamError",
    "Compose",
    "Composite",
    "ConfigError",
    "ConvNet",
    "DDPGLoss",
    "DQNLoss",
    "DiskFull",
    "DoubleToFloat",
    "DuelingCnnDQNet",
    "EGreedyModule",
    "EndOfStream",
    "EnvError",
    "EnvStage",
    "Epochs",
    "EpsilonAnnealing",
    "Evaluate",
    "Event",
    "EventBus",
    "EventLog",
    "EveryBatch",
    "FifoSampler",
    "FrameNorm",
    "FrameSkip",
    "GAE",
    "GrayScale",
    "GymEnv",
    "HardUpdate",
    "Hook",
    "IndependentNormal",
    "LearnerStage",
    "LossKeys",
    "MLP",
    "MetricsCSV",
    "NonFiniteError",
    "NoopResetEnv",
    "NormalParamExtractor",
    "ObservationNorm",
    "OneHot",
    "OrnsteinUhlenbeckModule",
    "Pipeline",
    "PipelineError",
    "PipelineFileError",
    "PolicyAnswer",
    "PolicyRequest",
    "PolicyStage",
    "PrioritizedSampler",
    "PriorityUpdate",
    "ProbabilisticActor",
    "ProgressBar",
    "QValueActor",
    "RamStorage",
    "RateLimiter",
    "ReceiveStream",
    "ReinforceLoss",
    "RemoteError",
    "ReplayBuffer",
    "Resize",
    "RewardScaling",
    "RewardSum",
    "RunContext",
    "RunDirError",
    "RunResult",
    "SACLoss",
    "SamplerStage",
    "SamplerWithoutReplacement",
    "SendStream",
    "SliceSampler",
    "SoftUpdate",
    "Spec",
    "Stage",
    "StageContext",
    "StageFailed",
    "StepCounter",
    "StoreError",
    "StreamError",
    "StreamRLError",
    "StreamStatistics",
    "SumTree",
    "TD0Estimator",
    "TD1Estimator",
    "TD3Loss",
    "TDLambdaEstimator",
    "TanhNormal",
    "ToTensorImage",
    "Transform",
    "TransformStage",
    "TransformedEnv",
    "Unbounded",
    "UniformSampler",
    "ValueEstimator",
    "ValueKeys",
    "ValueOperator",
    "VideoRecorder",
    "WorkerDied",
    "WouldBlock",
    "WriterStage",
    "ZarrStorage",
    "evaluate",
    "gae",
    "open_exchange",
    "open_stream",
    "run",
    "spec_from_space",
    "td0_return",
    "td1_return",
    "td_lambda_return",
]
