"""PPO on CartPole-v1, as a streaming pipeline: on-policy chunks, GAE, epochs of minibatches, versioned weights.

    streamrl run pipelines/ppo_cartpole.py
    streamrl run pipelines/ppo_cartpole.py --set algorithm=a2c      # or use pipelines/a2c_cartpole.py

    env group (worker) ──chunks [envs, T]──> gae ──> learner (epochs x minibatches) ──weights v+1──> policy
         ^                                                                                         │
         └──────────────── the policy starts a chunk only with weights at most max_policy_lag old ──┘

The policy samples from a categorical distribution over the actor's logits and records each action's
``sample_log_prob``; the advantage stage values the chunk with the critic as it is when the chunk arrives; the
learner makes ``epochs`` passes in shuffled minibatches, then publishes once. With ``max_policy_lag=1`` the envs
collect the next chunk while the learner trains on the last one (its data is then one version old).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from streamrl import (
    GAE,
    MLP,
    A2CLoss,
    AdvantageStage,
    Checkpoint,
    ClipPPOLoss,
    Epochs,
    Evaluate,
    EventLog,
    GymEnv,
    LearnerStage,
    MetricsCSV,
    Pipeline,
    ProbabilisticActor,
    ProgressBar,
    ValueOperator,
)


@dataclass
class Config:
    total_frames: int = 200_000
    """Stop after this many env frames."""
    seed: int = 0
    """Seed of torch, numpy and the envs."""
    device: str = "cpu"
    """Learner device (small MLPs: the CPU is faster than a GPU round trip)."""
    capture: str = "auto"
    """Learner updates: "auto" (a CUDA graph on CUDA when it can), "graph", "compile" (torch.compile), "off"."""
    num_envs: int = 8
    """CartPole copies stepped together (gymnasium's native vector env)."""
    replicas: int = 1
    """Copies of the collector group, each in its own worker process (own env seeds and traj_ids); each collects
    frames_per_chunk / replicas frames per update, so that a learner batch stays frames_per_chunk frames."""
    placement: Literal["worker_process", "in_process", "ray_actor"] = "worker_process"
    """Where the env + policy group runs: worker_process (own core), in_process, or ray_actor (Ray actors, on this
    machine or a Ray cluster: --ray-address)."""
    frames_per_chunk: int = 1024
    """Frames per chunk = per learner batch (num_envs x steps)."""
    algorithm: str = "ppo"
    """ppo (clipped surrogate) or a2c (one epoch, no clipping)."""
    epochs: int = 4
    """Passes over each chunk (a2c: 1)."""
    minibatch_size: int = 256
    """Rows per optimizer step (a2c: the whole chunk)."""
    max_policy_lag: int = 1
    """0: strictly on-policy; 1: collect the next chunk while the learner trains on the last."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the actor and the critic (tanh)."""
    lr: float = 2.5e-3
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.95
    """GAE lambda."""
    clip_epsilon: float = 0.2
    """PPO clipping range of the probability ratio."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    critic_coef: float = 0.5
    """Weight of the critic loss."""
    max_grad_norm: float = 0.5
    """Gradient-norm clipping threshold."""
    eval_every: int = 10_000
    """Frames between evaluations."""
    eval_episodes: int = 20
    """Episodes per evaluation (deterministic policy: the most likely action)."""
    target_return: float = 475.0
    """Stop once the evaluation mean reaches this return."""
    checkpoint_every: int = 50_000
    """Frames between checkpoints (what ``--resume`` starts from after a crash)."""


def build(cfg: Config) -> Pipeline:
    if cfg.algorithm not in ("ppo", "a2c"):
        raise ValueError(f"algorithm must be 'ppo' or 'a2c', got {cfg.algorithm!r}")
    env = GymEnv("CartPole-v1", num_envs=cfg.num_envs, seed=cfg.seed)
    torch.manual_seed(cfg.seed)

    # Actor: logits -> categorical policy (records sample_log_prob); critic: the state value.
    logits = TensorDictModule(MLP(2, in_features=4, num_cells=cfg.hidden, activation=nn.Tanh),
                              in_keys=["observation"], out_keys=["logits"])
    actor = ProbabilisticActor(logits, in_keys=("logits",), distribution_class=torch.distributions.Categorical)
    critic = ValueOperator(MLP(1, in_features=4, num_cells=cfg.hidden, activation=nn.Tanh))

    if cfg.algorithm == "ppo":
        loss: nn.Module = ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, entropy_bonus=cfg.entropy_coef > 0,
                                      entropy_coef=cfg.entropy_coef, critic_coef=cfg.critic_coef,
                                      loss_critic_type="l2")
        epochs, minibatch = cfg.epochs, cfg.minibatch_size
    else:
        loss = A2CLoss(actor, critic, entropy_coef=cfg.entropy_coef, critic_coef=cfg.critic_coef,
                       loss_critic_type="l2")
        epochs, minibatch = 1, cfg.frames_per_chunk
    optimizer = torch.optim.Adam(loss.parameters(), lr=cfg.lr, fused=True)
    learner = LearnerStage("learner", loss, optimizer, schedule=Epochs(epochs, minibatch), publish=actor,
                           max_grad_norm=cfg.max_grad_norm, device=cfg.device,
                           capture=cfg.capture)  # type: ignore[arg-type]

    p = Pipeline(f"{cfg.algorithm}_cartpole", config=cfg)
    collector = p.add_collector("collect", env, actor, frames_per_chunk=cfg.frames_per_chunk, rounds=True,
                                total_frames=cfg.total_frames, replicas=cfg.replicas, placement=cfg.placement,
                                max_policy_lag=cfg.max_policy_lag, record=("action", "sample_log_prob"))
    p.add(AdvantageStage("gae", GAE(gamma=cfg.gamma, lmbda=cfg.lmbda, value_network=critic, average_gae=True)),
          learner)
    p.connect(collector.chunks, "gae.chunks", capacity=1, join="rounds")  # one chunk of every replica
    p.connect("gae.chunks", "learner.batches", capacity=1)
    p.add_hook(
        Evaluate(GymEnv("CartPole-v1", num_envs=cfg.eval_episodes), actor, every_frames=cfg.eval_every,
                 episodes=cfg.eval_episodes, stop_at_return=cfg.target_return),
        ProgressBar(cfg.total_frames),
        EventLog(),
        MetricsCSV(every_frames=cfg.eval_every),
        Checkpoint(every_frames=cfg.checkpoint_every),
    )
    return p
