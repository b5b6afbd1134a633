"""DQN on CartPole-v1, as a streaming pipeline.

    streamrl run pipelines/dqn_cartpole.py --seed 0
    streamrl run pipelines/dqn_cartpole.py --set prioritized=true      # prioritized replay

Collection (envs + epsilon-greedy policy) runs in a worker process; the replay store, the sampler and the
learner run in the main process; the learner publishes its weights to the policy every few updates. The run
stops when the greedy policy averages >= 475 over 20 evaluation episodes, or after ``total_frames`` frames.

    env group (worker) ──chunks──> writer ──[zarr store]──> sampler ──batches──> learner
         ^                                                                          │
         └───────────────────────── weights (versioned) ────────────────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tensordict.nn import TensorDictSequential

from streamrl import (
    MLP,
    Checkpoint,
    DQNLoss,
    EGreedyModule,
    EpsilonAnnealing,
    Evaluate,
    EventLog,
    EveryBatch,
    GymEnv,
    HardUpdate,
    LearnerStage,
    MetricsCSV,
    Pipeline,
    PrioritizedSampler,
    PriorityUpdate,
    ProgressBar,
    QValueActor,
    RateLimiter,
    ReplayBuffer,
    SamplerStage,
    WriterStage,
    ZarrStorage,
)


@dataclass
class Config:
    total_frames: int = 100_000
    """Stop after this many env frames (one frame = one step of one env)."""
    seed: int = 0
    """Seed of torch, numpy, the envs and the evaluation envs."""
    device: str = "auto"
    """Learner device: cpu, cuda, or auto (CUDA when available)."""
    capture: str = "auto"
    """Learner updates: "auto" (a CUDA graph on CUDA when it can), "graph", "compile" (torch.compile), "off"."""
    num_envs: int = 1
    """CartPole copies stepped together (gymnasium's native vector env). One is enough: collection runs in its
    own process, hidden behind the learner, which is the bottleneck."""
    replicas: int = 1
    """Copies of the collector group, each in its own worker process (own env seeds and traj_ids); total_frames is
    their budget together."""
    frames_per_chunk: int = 64
    """Frames per chunk sent from the env stage to the replay writer; the policy takes new weights between chunks."""
    placement: Literal["worker_process", "in_process", "ray_actor"] = "worker_process"
    """Where the env + policy group runs: worker_process (own core), in_process, or ray_actor (Ray actors, on this
    machine or a Ray cluster: --ray-address)."""
    buffer_size: int = 100_000
    """Replay capacity in transitions (a zarr store in the run directory)."""
    batch_size: int = 128
    """Transitions per learner update."""
    prioritized: bool = False
    """Prioritized replay: sample transitions in proportion to |TD error| ** alpha, weight the loss by importance
    weights, and update priorities after each loss."""
    alpha: float = 0.6
    """Prioritized replay: how strongly priorities shape sampling (0: uniform)."""
    beta: float = 0.4
    """Prioritized replay: importance-weight exponent (1: fully corrects the sampling bias)."""
    updates_per_frame: float = 0.125
    """Learner updates per collected frame, kept by the replay rate limiter."""
    min_fill: int = 1_000
    """Transitions in replay before the first update."""
    lr: float = 4e-3
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (128, 128)
    """Hidden layer sizes of the Q-network."""
    max_grad_norm: float = 10.0
    """Gradient-norm clipping threshold."""
    target_update_every: int = 24
    """Hard target-network update period, in learner updates (at 12 or less the Q-values can diverge)."""
    eps_init: float = 1.0
    """Initial exploration epsilon."""
    eps_end: float = 0.04
    """Final exploration epsilon."""
    eps_frames: int = 8_000
    """Frames over which epsilon anneals linearly."""
    publish_every: int = 8
    """Learner updates between weight publications to the policy."""
    eval_every: int = 2_000
    """Frames between evaluations (20 greedy episodes)."""
    checkpoint_every: int = 20_000
    """Frames between checkpoints (what ``--resume`` starts from after a crash); one is also saved at the end."""
    eval_episodes: int = 20
    """Episodes per evaluation."""
    target_return: float = 475.0
    """Stop once the evaluation mean reaches this return."""


def build(cfg: Config) -> Pipeline:
    env = GymEnv("CartPole-v1", num_envs=cfg.num_envs, seed=cfg.seed)
    n_actions = 2

    # Model: a Q-network, its greedy actor, and epsilon-greedy exploration on top for collection.
    torch.manual_seed(cfg.seed)
    q_net = MLP(n_actions, in_features=4, num_cells=cfg.hidden)
    actor = QValueActor(q_net)
    explore = EGreedyModule(n_actions, eps_init=cfg.eps_init, eps_end=cfg.eps_end, annealing_frames=cfg.eps_frames)
    collect_policy = TensorDictSequential(actor, explore)

    # Loss and optimizer: double DQN with a Huber loss; the loss owns the target network.
    loss = DQNLoss(actor, gamma=cfg.gamma, double_dqn=True, loss="smooth_l1")
    optimizer = torch.optim.Adam(loss.value_net.parameters(), lr=cfg.lr, fused=True)

    # Replay: a zarr store paced by a samples-per-insert rate limiter; uniform or prioritized sampling.
    samples_per_insert = cfg.updates_per_frame * cfg.batch_size
    replay = ReplayBuffer(
        ZarrStorage(cfg.buffer_size),
        sampler=PrioritizedSampler(alpha=cfg.alpha, beta=cfg.beta) if cfg.prioritized else None,
        batch_size=cfg.batch_size,
        limiter=RateLimiter(samples_per_insert=samples_per_insert, min_fill=cfg.min_fill,
                            tolerance=samples_per_insert * cfg.frames_per_chunk,  # a chunk of slack
                            batch_size=cfg.batch_size),
    )

    learner = LearnerStage("learner", loss, optimizer, schedule=EveryBatch(publish_every=cfg.publish_every),
                           publish=actor, max_grad_norm=cfg.max_grad_norm,
                           target_update=HardUpdate(loss, every=cfg.target_update_every), device=cfg.device,
                           capture=cfg.capture)  # type: ignore[arg-type]
    p = Pipeline("dqn_cartpole", config=cfg)
    collector = p.add_collector("collect", env, collect_policy, frames_per_chunk=cfg.frames_per_chunk,
                                total_frames=cfg.total_frames, weights_module=actor, replicas=cfg.replicas,
                                placement=cfg.placement)
    p.add(WriterStage("writer", replay), SamplerStage("sampler", replay, pin_memory=True), learner)
    p.connect(collector.chunks, "writer.chunks", capacity=1)
    p.connect("sampler.batches", "learner.batches", capacity=4)

    p.add_hook(EpsilonAnnealing(explore), group=collector.group)
    p.add_hook(
        Evaluate(GymEnv("CartPole-v1", num_envs=cfg.eval_episodes), actor, every_frames=cfg.eval_every,
                 episodes=cfg.eval_episodes, stop_at_return=cfg.target_return),
        ProgressBar(cfg.total_frames),
        EventLog(),
        MetricsCSV(every_frames=cfg.eval_every),
        Checkpoint(every_frames=cfg.checkpoint_every),
    )
    if cfg.prioritized:
        p.add_hook(PriorityUpdate(replay))  # TD errors -> priorities, after every loss
    return p
