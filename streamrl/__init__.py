"""streamrl: reinforcement learning as a streaming dataflow.

A training run is a :class:`Pipeline` of async stages (env stepping, policy inference, replay, learning) joined
by bounded streams; hooks subscribe to the events the stages publish. ``streamrl.run(pipeline, run_dir)`` runs
one; ``streamrl run pipeline.py`` does the same from the command line.

Names are imported lazily (on first use), so ``import streamrl`` and the command line start fast and worker
processes can be prepared before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

#: The subpackages TorchRL users import from; every name in their ``__all__`` is exported here too.
_SUBPACKAGES = ("envs", "modules", "objectives", "replay", "transforms")

#: Where each exported name is defined: the names of the modules outside the subpackages (pipeline, stages,
#: streams, hooks, errors) are listed here, the subpackages' names are added from their own ``_EXPORTS`` below.
_EXPORTS: dict[str, str] = {
    "AdvantageStage": "streamrl.stages.advantage",
    "BrokenStreamError": "streamrl.errors",
    "CSVSink": "streamrl.hooks.loggers",
    "Checkpoint": "streamrl.hooks.checkpoint",
    "Collector": "streamrl.collector",
    "CheckpointError": "streamrl.errors",
    "ClosedStreamError": "streamrl.errors",
    "ConfigError": "streamrl.errors",
    "DiskFull": "streamrl.errors",
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
    "Hook": "streamrl.events",
    "LearnerStage": "streamrl.stages.learner",
    "Logger": "streamrl.hooks.loggers",
    "MetricsCSV": "streamrl.hooks.logging",
    "NonFiniteError": "streamrl.errors",
    "Pipeline": "streamrl.pipeline",
    "PipelineError": "streamrl.errors",
    "PipelineFileError": "streamrl.errors",
    "PolicyAnswer": "streamrl.stages.policy",
    "PolicyRequest": "streamrl.stages.policy",
    "PolicyStage": "streamrl.stages.policy",
    "PriorityUpdate": "streamrl.hooks.priority",
    "ProgressBar": "streamrl.hooks.progress",
    "ReceiveStream": "streamrl.streams",
    "RemoteError": "streamrl.errors",
    "ReplicaLost": "streamrl.errors",
    "RunContext": "streamrl.execution.context",
    "RunDirError": "streamrl.errors",
    "RunResult": "streamrl.execution.main",
    "SamplerStage": "streamrl.stages.replay",
    "SendStream": "streamrl.streams",
    "Sink": "streamrl.hooks.loggers",
    "Stage": "streamrl.stages.base",
    "StageContext": "streamrl.stages.base",
    "StageFailed": "streamrl.errors",
    "StoreError": "streamrl.errors",
    "StreamError": "streamrl.errors",
    "StreamRLError": "streamrl.errors",
    "StreamStatistics": "streamrl.streams",
    "TensorBoardSink": "streamrl.hooks.loggers",
    "TransformStage": "streamrl.stages.transform",
    "WandbSink": "streamrl.hooks.loggers",
    "WorkerDied": "streamrl.errors",
    "WouldBlock": "streamrl.errors",
    "WriterStage": "streamrl.stages.replay",
    "evaluate": "streamrl.hooks.eval",
    "open_exchange": "streamrl.exchange",
    "open_stream": "streamrl.streams",
    "run": "streamrl.execution.main",
}
# ``streamrl.transforms`` comes last, so the transforms ``streamrl.envs`` re-exports map to where they are defined.
for _package in _SUBPACKAGES:
    _EXPORTS.update(importlib.import_module(f"streamrl.{_package}")._EXPORTS)
del _package

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from streamrl.collector import Collector
    from streamrl.envs import (
        Bounded,
        Categorical,
        CatFrames,
        CatTensors,
        Compose,
        Composite,
        DoubleToFloat,
        EnvBase,
        FrameSkip,
        GrayScale,
        GymEnv,
        GymWrapper,
        NoopResetEnv,
        ObservationNorm,
        OneHot,
        Resize,
        RewardScaling,
        RewardSum,
        Spec,
        SpecMismatch,
        StepCounter,
        ToTensorImage,
        Transform,
        TransformedEnv,
        Unbounded,
        VideoRecorder,
        check_env_specs,
        spec_from_space,
        step_mdp,
    )
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
        ReplicaLost,
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
    from streamrl.hooks.loggers import CSVSink, Logger, Sink, TensorBoardSink, WandbSink
    from streamrl.hooks.logging import EventLog, MetricsCSV
    from streamrl.hooks.priority import PriorityUpdate
    from streamrl.hooks.progress import ProgressBar
    from streamrl.hooks.schedules import EpsilonAnnealing
    from streamrl.modules import (
        MLP,
        Actor,
        AdditiveGaussianModule,
        ConvNet,
        DuelingCnnDQNet,
        EGreedyModule,
        FrameNorm,
        IndependentNormal,
        NormalParamExtractor,
        OrnsteinUhlenbeckModule,
        ProbabilisticActor,
        QValueActor,
        TanhNormal,
        ValueOperator,
    )
    from streamrl.objectives import (
        GAE,
        A2CLoss,
        ClipPPOLoss,
        DDPGLoss,
        DQNLoss,
        HardUpdate,
        LossKeys,
        ReinforceLoss,
        SACLoss,
        SoftUpdate,
        TD0Estimator,
        TD1Estimator,
        TD3Loss,
        TDLambdaEstimator,
        ValueEstimator,
        ValueEstimators,
        ValueKeys,
        gae,
        td0_return,
        td1_return,
        td_lambda_return,
    )
    from streamrl.pipeline import Pipeline
    from streamrl.replay import (
        FifoSampler,
        MultiStep,
        PrioritizedSampler,
        RamStorage,
        RateLimiter,
        ReplayBuffer,
        Sampler,
        SamplerWithoutReplacement,
        SliceSampler,
        Storage,
        SumTree,
        UniformSampler,
        ZarrStorage,
    )
    from streamrl.stages.advantage import AdvantageStage
    from streamrl.stages.base import Stage, StageContext
    from streamrl.stages.env import EnvStage
    from streamrl.stages.learner import Epochs, EveryBatch, LearnerStage
    from streamrl.stages.policy import PolicyAnswer, PolicyRequest, PolicyStage
    from streamrl.stages.replay import SamplerStage, WriterStage
    from streamrl.stages.transform import TransformStage
    from streamrl.streams import ReceiveStream, SendStream, StreamStatistics, open_stream


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
