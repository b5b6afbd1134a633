"""PPO on InvertedDoublePendulum-v5 (mujoco), with the hyperparameters of TorchRL's PPO tutorial, as stages.

    pip install -e '.[mujoco]'
    streamrl run pipelines/ppo_inverted_double_pendulum.py

    env group (worker): mujoco → DoubleToFloat → ObservationNorm (init_stats) → StepCounter ⇄ policy (TanhNormal)
        └──chunks (1,000 frames)──> gae (critic) ──> learner: 10 epochs x minibatches of 64, cosine LR ──weights──┘

The actor is a 3x256 tanh MLP whose output splits into the loc and scale of a TanhNormal bounded by the action
spec; the critic is a 3x256 tanh MLP. Observations are normalised with statistics measured on random play before
training (``ObservationNorm.init_stats``), the same statistics in the evaluation env. With ``max_policy_lag=1``
collection of the next 1,000 frames overlaps the learner's 160 updates on the last ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

from streamrl import (
    GAE,
    MLP,
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
from streamrl.transforms import Compose, DoubleToFloat, ObservationNorm, StepCounter, TransformedEnv

ENV = "InvertedDoublePendulum-v5"


@dataclass
class Config:
    total_frames: int = 1_000_000
    """Stop after this many env frames."""
    seed: int = 0
    """Seed of torch, numpy and the envs."""
    device: str = "cpu"
    """Learner device."""
    capture: str = "auto"
    """Learner updates: "auto" (a CUDA graph on CUDA when it can), "graph", "compile" (torch.compile), "off"."""
    num_envs: int = 4
    """Envs stepped together (sync vector env: the transforms need same-step resets). One policy call serves all
    of them, so four envs collect ~2.5x faster than one on a core; a chunk is still 1,000 frames."""
    replicas: int = 1
    """Copies of the collector group, each in its own worker process (own env seeds and traj_ids); each collects
    frames_per_chunk / replicas frames per update, so that a learner batch stays frames_per_chunk frames."""
    placement: Literal["worker_process", "in_process", "ray_actor"] = "worker_process"
    """Where the env + policy group runs: worker_process (own core), in_process, or ray_actor (Ray actors, on this
    machine or a Ray cluster: --ray-address)."""
    frames_per_chunk: int = 1_000
    """Frames per chunk = per learner batch (num_envs x 250 steps)."""
    init_stats_steps: int = 1_000
    """Random steps whose observations give the normalisation statistics."""
    epochs: int = 10
    """Passes over each chunk."""
    minibatch_size: int = 64
    """Rows per optimizer step."""
    max_policy_lag: int = 1
    """0: strictly on-policy; 1: collect the next chunk while the learner trains on the last."""
    num_cells: int = 256
    """Width of the three hidden layers of the actor and the critic."""
    lr: float = 3e-4
    """Adam learning rate at the start; it anneals to 0 along a cosine over the run."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    gamma: float = 0.99
    """Discount factor."""
    lmbda: float = 0.95
    """GAE lambda."""
    clip_epsilon: float = 0.2
    """PPO clipping range of the probability ratio."""
    entropy_coef: float = 1e-4
    """Entropy bonus coefficient."""
    eval_every: int = 50_000
    """Frames between evaluations."""
    eval_episodes: int = 5
    """Episodes per evaluation (deterministic policy: the squashed mean)."""
    target_return: float = 9_000.0
    """Stop once the evaluation mean reaches this return."""
    checkpoint_every: int = 100_000
    """Frames between checkpoints (what ``--resume`` starts from after a crash)."""


def make_env(num_envs: int, seed: int) -> TransformedEnv:
    """The mujoco env with float32 observations, a normaliser (statistics still to be measured) and a counter."""
    return TransformedEnv(GymEnv(ENV, num_envs=num_envs, backend="sync", seed=seed), Compose(
        DoubleToFloat(), ObservationNorm(in_keys=["observation"], standard_normal=True), StepCounter()))


def build(cfg: Config) -> Pipeline:
    env = make_env(cfg.num_envs, cfg.seed)
    norm = env.transform[1]
    norm.init_stats(cfg.init_stats_steps, reduce_dim=(0, 1), cat_dim=0)
    eval_env = make_env(cfg.eval_episodes, cfg.seed + 1)
    eval_env.transform[1].load_state_dict(norm.state_dict())  # the statistics the agent trains with
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    env.close()  # reopened in the collection worker

    torch.manual_seed(cfg.seed)
    cells = (cfg.num_cells,) * 3
    params = TensorDictModule(nn.Sequential(MLP(2 * act_dim, in_features=obs_dim, num_cells=cells, activation=nn.Tanh),
                                            NormalParamExtractor()),
                              in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(params, spec=env.action_spec)
    critic = ValueOperator(MLP(1, in_features=obs_dim, num_cells=cells, activation=nn.Tanh))

    loss = ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, entropy_bonus=cfg.entropy_coef > 0,
                       entropy_coef=cfg.entropy_coef, critic_coef=1.0, loss_critic_type="smooth_l1")
    optimizer = torch.optim.Adam(loss.parameters(), lr=cfg.lr, fused=True)
    updates = (cfg.total_frames // cfg.frames_per_chunk) * cfg.epochs * math.ceil(cfg.frames_per_chunk
                                                                                   / cfg.minibatch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, updates), 0.0)
    learner = LearnerStage("learner", loss, optimizer, schedule=Epochs(cfg.epochs, cfg.minibatch_size),
                           publish=actor, max_grad_norm=cfg.max_grad_norm, scheduler=scheduler, device=cfg.device,
                           capture=cfg.capture)  # type: ignore[arg-type]

    p = Pipeline("ppo_inverted_double_pendulum", config=cfg)
    collector = p.add_collector("collect", env, actor, frames_per_chunk=cfg.frames_per_chunk, rounds=True,
                                total_frames=cfg.total_frames, replicas=cfg.replicas, placement=cfg.placement,
                                max_policy_lag=cfg.max_policy_lag, record=("action", "sample_log_prob"))
    p.add(AdvantageStage("gae", GAE(gamma=cfg.gamma, lmbda=cfg.lmbda, value_network=critic, average_gae=True)),
          learner)
    p.connect(collector.chunks, "gae.chunks", capacity=1, join="rounds")  # one chunk of every replica
    p.connect("gae.chunks", "learner.batches", capacity=1)
    p.add_hook(
        Evaluate(eval_env, actor, every_frames=cfg.eval_every, episodes=cfg.eval_episodes,
                 stop_at_return=cfg.target_return),
        ProgressBar(cfg.total_frames),
        EventLog(),
        MetricsCSV(every_frames=cfg.eval_every),
        Checkpoint(every_frames=cfg.checkpoint_every),
    )
    return p
