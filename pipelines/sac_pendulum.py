"""SAC on Pendulum-v1, as a streaming pipeline.

    streamrl run pipelines/sac_pendulum.py --seed 0
    streamrl run pipelines/sac_pendulum.py --set fixed_alpha=true --set alpha_init=0.1   # no entropy tuning

A tanh-squashed Gaussian policy and twin Q critics; the loss tunes the entropy temperature alpha towards an
entropy of -1 (minus the action dimension). Collection (four envs and the sampling policy) runs in a worker
process; the replay (RAM), the sampler and the learner run in the main process, one update per collected frame.
The run stops when the deterministic policy (tanh of the mean) averages >= -200 over 5 evaluation episodes, or
after ``total_frames`` frames.

    env group (worker) ──chunks──> writer ──[RAM replay]──> sampler ──batches──> learner (actor, 2 critics, alpha)
         ^                                                                          │
         └───────────────────────── weights (versioned) ────────────────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from streamrl import (
    MLP,
    Bounded,
    Checkpoint,
    Evaluate,
    EventLog,
    EveryBatch,
    GymEnv,
    LearnerStage,
    MetricsCSV,
    NormalParamExtractor,
    Pipeline,
    ProbabilisticActor,
    ProgressBar,
    RamStorage,
    RateLimiter,
    ReplayBuffer,
    SACLoss,
    SamplerStage,
    SoftUpdate,
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
    """Adam learning rate of the actor, the critics and alpha (one optimizer over the loss's parameters)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Soft target update rate: target <- (1 - tau) * target + tau * online, after every update."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the actor and of each critic."""
    alpha_init: float = 1.0
    """Initial entropy temperature."""
    fixed_alpha: bool = False
    """Keep alpha at alpha_init instead of tuning it towards the target entropy (-action_dim)."""
    publish_every: int = 4
    """Learner updates between weight publications to the policy."""
    eval_every: int = 2_000
    """Frames between evaluations."""
    eval_episodes: int = 5
    """Episodes per evaluation (200 steps each)."""
    checkpoint_every: int = 10_000
    """Frames between checkpoints (what ``--resume`` starts from after a crash); one is also saved at the end."""
    target_return: float = -200.0
    """Stop once the evaluation mean reaches this return."""


def build(cfg: Config) -> Pipeline:
    env = GymEnv("Pendulum-v1", num_envs=cfg.num_envs, seed=cfg.seed)
    action_spec = env.action_spec
    assert isinstance(action_spec, Bounded), action_spec  # one torque in [-2, 2]
    n_obs, n_act = 3, action_spec.shape[-1]  # observation: cos(angle), sin(angle), angular velocity

    # Model: the policy writes loc and scale, a TanhNormal over [-2, 2] samples the torque; two Q critics.
    torch.manual_seed(cfg.seed)
    net = nn.Sequential(MLP(2 * n_act, in_features=n_obs, num_cells=cfg.hidden), NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                               spec=action_spec)
    critics = [ValueOperator(MLP(1, in_features=n_obs + n_act, num_cells=cfg.hidden), in_keys=["observation", "action"])
               for _ in range(2)]

    # Loss and optimizer: actor + critic + alpha terms, each with gradients for its own parameters only, so one
    # Adam over their sum updates every network as separate optimizers would. The loss owns the target critics.
    loss = SACLoss(actor, critics, gamma=cfg.gamma, alpha_init=cfg.alpha_init, fixed_alpha=cfg.fixed_alpha)
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
    p = Pipeline("sac_pendulum", config=cfg)
    # the policy samples actions (the actor's default interaction type is RANDOM)
    collector = p.add_collector("collect", env, actor, frames_per_chunk=cfg.frames_per_chunk,
                                total_frames=cfg.total_frames, replicas=cfg.replicas,
                                placement=cfg.placement)
    p.add(WriterStage("writer", replay), SamplerStage("sampler", replay, pin_memory=True), learner)
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=4)

    p.add_hook(
        Evaluate(GymEnv("Pendulum-v1", num_envs=cfg.eval_episodes), actor, every_frames=cfg.eval_every,
                 episodes=cfg.eval_episodes, stop_at_return=cfg.target_return),
        ProgressBar(cfg.total_frames),
        EventLog(),
        MetricsCSV(every_frames=cfg.eval_every),
        Checkpoint(every_frames=cfg.checkpoint_every),
    )
    return p
