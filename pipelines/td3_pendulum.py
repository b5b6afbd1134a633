"""TD3 on Pendulum-v1, as a streaming pipeline: ``ddpg_pendulum.py``'s stages with the TD3 loss.

    streamrl run pipelines/td3_pendulum.py --seed 0
    streamrl run pipelines/td3_pendulum.py --set policy_delay=1     # the actor every update

DDPG with TD3's three changes: twin critics whose minimum makes the target, clipped noise on the target action,
and an actor updated every ``policy_delay`` updates. Everything else (Gaussian exploration annealed over
``sigma_frames``, collection in a worker process, RAM replay at one update per frame, evaluation until the
noise-free policy averages >= -200) is the DDPG pipeline's.

    env group (worker) ──chunks──> writer ──[RAM replay]──> sampler ──batches──> learner (actor, 2 critics)
         ^                                                                          │
         └───────────────────────── weights (versioned) ────────────────────────────┘
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamrl import Actor, Bounded, Pipeline, TD3Loss, ValueOperator
from streamrl.loader import load_module

ddpg = load_module(Path(__file__).with_name("ddpg_pendulum.py"))


@dataclass
class Config(ddpg.Config):  # type: ignore[name-defined,misc]
    policy_noise: float = 0.2
    """Standard deviation of the target-action noise, as a fraction of the action half-range (2)."""
    noise_clip: float = 0.5
    """Clip of the target-action noise, as a fraction of the action half-range."""
    policy_delay: int = 2
    """Critic updates per actor update; between them the actor has no gradient and Adam leaves it alone."""


def td3_loss(cfg: Config, actor: Actor, action_spec: Bounded, new_critic: Callable[[], ValueOperator]) -> TD3Loss:
    """Twin critics; the loss owns the target actor and critics."""
    return TD3Loss(actor, [new_critic(), new_critic()], gamma=cfg.gamma, action_spec=action_spec,
                   policy_noise=cfg.policy_noise, noise_clip=cfg.noise_clip, policy_delay=cfg.policy_delay)


def build(cfg: Config) -> Pipeline:
    return ddpg.build_with_loss(cfg, "td3_pendulum", td3_loss)  # type: ignore[no-any-return]
