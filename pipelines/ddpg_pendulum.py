"""DDPG on Pendulum-v1, as a streaming pipeline.

    streamrl run pipelines/ddpg_pendulum.py --seed 0
    streamrl run pipelines/ddpg_pendulum.py --set sigma_init=0.4 --set sigma_end=0.4   # constant noise

A deterministic tanh policy explores with additive Gaussian noise, annealed over ``sigma_frames``; one Q critic,
and target copies of both. Collection (four envs and the noisy policy) runs in a worker process; the replay (RAM),
the sampler and the learner run in the main process, one update per collected frame. The run stops when the
noise-free policy averages >= -200 over 5 evaluation episodes, or after ``total_frames`` frames.

    env group (worker) ──chunks──> writer ──[RAM replay]──> sampler ──batches──> learner (actor, critic)
         ^                                                                          │
         └───────────────────────── weights (versioned) ────────────────────────────┘
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict.nn import TensorDictSequential

from streamrl import (
    MLP,
    Actor,
    AdditiveGaussianModule,
    Bounded,
    Checkpoint,
    DDPGLoss,
    EpsilonAnnealing,
    Evaluate,
    EventLog,
    EveryBatch,
    GymEnv,
    LearnerStage,
    MetricsCSV,
    Pipeline,
    ProgressBar,
    RamStorage,
    RateLimiter,
    ReplayBuffer,
    SamplerStage,
    SoftUpdate,
    TD3Loss,
    ValueOperator,
    WriterStage,
)


@dataclass
class Config:
    total_frames: int = 20_000
    """Stop after this many env frames (one frame = one step of one env)."""
    seed: int = 0
    """Seed of torch, numpy, the envs and the evaluation envs."""
    device: str = "auto"
    """Learner device: cpu, cuda, or auto (CUDA when available)."""
    capture: str = "auto"
    """Learner updates: "auto" (a CUDA graph on CUDA when it can), "graph", "compile" (torch.compile), "off"."""
    num_envs: int = 4
    """Pendulum copies stepped together in the collection process."""
    replicas: int = 1
    """Copies of the collector group, each in its own worker process (own env seeds and traj_ids); total_frames is
    their budget together."""
    frames_per_chunk: int = 64
    """Frames per chunk sent from the env stage to the replay writer; the policy takes new weights between chunks."""
    placement: Literal["worker_process", "in_process", "ray_actor"] = "worker_process"
    """Where the env + policy group runs: worker_process (own core), in_process, or ray_actor (Ray actors, on this
    machine or a Ray cluster: --ray-address)."""
    buffer_size: int = 100_000
    """Replay capacity in transitions (RAM)."""
    batch_size: int = 256
    """Transitions per learner update."""
    updates_per_frame: float = 1.0
    """Learner updates per collected frame, kept by the replay rate limiter."""
    min_fill: int = 1_000
    """Transitions in replay before the first update."""
    lr: float = 3e-4
    """Adam learning rate of the actor and the critic (one optimizer over the loss's parameters)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Soft target update rate: target <- (1 - tau) * target + tau * online, after every update."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the actor and of the critic."""
    sigma_init: float = 0.5
    """Initial standard deviation of the exploration noise, in torque units (actions lie in [-2, 2])."""
    sigma_end: float = 0.2
    """Final standard deviation of the exploration noise."""
    sigma_frames: int = 10_000
    """Frames over which the noise anneals linearly from sigma_init to sigma_end."""
    publish_every: int = 4
    """Learner updates between weight publications to the policy."""
    eval_every: int = 2_000
    """Frames between evaluations (the policy without noise)."""
    eval_episodes: int = 5
    """Episodes per evaluation (200 steps each)."""
    checkpoint_every: int = 10_000
    """Frames between checkpoints (what ``--resume`` starts from after a crash); one is also saved at the end."""
    target_return: float = -200.0
    """Stop once the evaluation mean reaches this return."""


def ddpg_loss(cfg: Config, actor: Actor, action_spec: Bounded, new_critic: Callable[[], ValueOperator]) -> DDPGLoss:
    """One Q critic; the loss owns the target actor and critic."""
    return DDPGLoss(actor, new_critic(), gamma=cfg.gamma)


def build(cfg: Config) -> Pipeline:
    return build_with_loss(cfg, "ddpg_pendulum", ddpg_loss)


def build_with_loss(cfg: Config, name: str, make_loss: Callable[..., DDPGLoss | TD3Loss]) -> Pipeline:
    """The pipeline around ``make_loss(cfg, actor, action_spec, new_critic)`` (``td3_pendulum.py`` reuses it)."""
    env = GymEnv("Pendulum-v1", num_envs=cfg.num_envs, seed=cfg.seed)
    action_spec = env.action_spec
    assert isinstance(action_spec, Bounded), action_spec  # one torque in [-2, 2]
    n_obs, n_act = 3, action_spec.shape[-1]  # observation: cos(angle), sin(angle), angular velocity

    # Model: a deterministic actor squashed into [-2, 2] and a Q critic; Gaussian noise on top for collection.
    torch.manual_seed(cfg.seed)
    actor = Actor(MLP(n_act, in_features=n_obs, num_cells=cfg.hidden), spec=action_spec)

    def new_critic() -> ValueOperator:
        return ValueOperator(MLP(1, in_features=n_obs + n_act, num_cells=cfg.hidden), in_keys=["observation", "action"])

    explore = AdditiveGaussianModule(action_spec, sigma_init=cfg.sigma_init, sigma_end=cfg.sigma_end,
                                     annealing_frames=cfg.sigma_frames)
    collect_policy = TensorDictSequential(actor, explore)

    # Loss and optimizer: actor + critic terms, each with gradients for its own parameters only, so one Adam over
    # their sum updates the networks as separate optimizers would.
    loss = make_loss(cfg, actor, action_spec, new_critic)
    optimizer = torch.optim.Adam(loss.parameters(), lr=cfg.lr, fused=True)

    # Replay: RAM, paced by a samples-per-insert rate limiter (updates_per_frame updates per collected frame).
    samples_per_insert = cfg.updates_per_frame * cfg.batch_size
    replay = ReplayBuffer(
        RamStorage(cfg.buffer_size),
        batch_size=cfg.batch_size,
        limiter=RateLimiter(samples_per_insert=samples_per_insert, min_fill=cfg.min_fill,
                            tolerance=samples_per_insert * cfg.frames_per_chunk,  # a chunk of slack
                            batch_size=cfg.batch_size),
    )

    learner = LearnerStage("learner", loss, optimizer, schedule=EveryBatch(publish_every=cfg.publish_every),
                           publish=actor, target_update=SoftUpdate(loss, tau=cfg.tau), device=cfg.device,
                           capture=cfg.capture)  # type: ignore[arg-type]
    p = Pipeline(name, config=cfg)
    collector = p.add_collector("collect", env, collect_policy, frames_per_chunk=cfg.frames_per_chunk,
                                total_frames=cfg.total_frames, weights_module=actor, replicas=cfg.replicas,
                                placement=cfg.placement)
    p.add(WriterStage("writer", replay), SamplerStage("sampler", replay, pin_memory=True), learner)
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=4)

    p.add_hook(EpsilonAnnealing(explore), group=collector.group)  # anneals sigma where the policy runs
    p.add_hook(
        Evaluate(GymEnv("Pendulum-v1", num_envs=cfg.eval_episodes), actor, every_frames=cfg.eval_every,
                 episodes=cfg.eval_episodes, stop_at_return=cfg.target_return),
        ProgressBar(cfg.total_frames),
        EventLog(),
        MetricsCSV(every_frames=cfg.eval_every),
        Checkpoint(every_frames=cfg.checkpoint_every),
    )
    return p
