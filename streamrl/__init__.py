"""streamrl: reinforcement learning as a streaming dataflow.

A training run is a :class:`Pipeline` of async stages (env stepping, policy inference, replay, learning) joined
by bounded streams; hooks subscribe to the events the stages publish. ``streamrl.run(pipeline, run_dir)`` runs
one; ``streamrl run pipeline.py`` does the same from the command line.
"""

from streamrl.envs.gym import GymEnv
from streamrl.envs.specs import Bounded, Categorical, Composite, OneHot, Spec, Unbounded, spec_from_space
from streamrl.errors import (
    BrokenStreamError,
    ClosedStreamError,
    ConfigError,
    EndOfStream,
    EnvError,
    PipelineError,
    RemoteError,
    StageFailed,
    StoreError,
    StreamError,
    StreamRLError,
    WorkerDied,
    WouldBlock,
)
from streamrl.events import Event, EventBus, Hook
from streamrl.hooks.checkpoint import Checkpoint
from streamrl.hooks.eval import Evaluate, evaluate
from streamrl.hooks.logging import EventLog, MetricsCSV
from streamrl.hooks.progress import ProgressBar
from streamrl.hooks.schedules import EpsilonAnnealing, TargetNetworkUpdate
from streamrl.modules.actors import QValueActor
from streamrl.modules.exploration import EGreedy
from streamrl.modules.nets import MLP
from streamrl.objectives.dqn import DQNLoss
from streamrl.objectives.updaters import HardUpdate, SoftUpdate
from streamrl.pipeline import Pipeline
from streamrl.replay.buffer import ReplayBuffer
from streamrl.replay.ratelimit import RateLimiter
from streamrl.replay.samplers import UniformSampler
from streamrl.replay.storage import RamStorage, ZarrStorage
from streamrl.runtime import RunContext, RunResult, run
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.env import EnvStage
from streamrl.stages.learner import LearnerStage
from streamrl.stages.policy import PolicyStage
from streamrl.stages.replay import SamplerStage, WriterStage
from streamrl.streams import ReceiveStream, SendStream, StreamStatistics, open_stream

__all__ = [
    "Bounded",
    "BrokenStreamError",
    "Categorical",
    "Checkpoint",
    "ClosedStreamError",
    "Composite",
    "ConfigError",
    "DQNLoss",
    "EGreedy",
    "EndOfStream",
    "EnvError",
    "EnvStage",
    "EpsilonAnnealing",
    "Evaluate",
    "Event",
    "EventBus",
    "EventLog",
    "GymEnv",
    "HardUpdate",
    "Hook",
    "LearnerStage",
    "MLP",
    "MetricsCSV",
    "OneHot",
    "Pipeline",
    "PipelineError",
    "PolicyStage",
    "ProgressBar",
    "QValueActor",
    "RamStorage",
    "RateLimiter",
    "ReceiveStream",
    "RemoteError",
    "ReplayBuffer",
    "RunContext",
    "RunResult",
    "SamplerStage",
    "SendStream",
    "SoftUpdate",
    "Spec",
    "Stage",
    "StageContext",
    "StageFailed",
    "StoreError",
    "StreamError",
    "StreamRLError",
    "StreamStatistics",
    "TargetNetworkUpdate",
    "Unbounded",
    "UniformSampler",
    "WorkerDied",
    "WouldBlock",
    "WriterStage",
    "ZarrStorage",
    "evaluate",
    "open_stream",
    "run",
    "spec_from_space",
]
