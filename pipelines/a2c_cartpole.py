"""A2C on CartPole-v1: the stages of ``ppo_cartpole.py`` with the A2C loss, one update per (short) chunk.

    streamrl run pipelines/a2c_cartpole.py

Each chunk of ``frames_per_chunk`` fresh frames gets GAE advantages and makes exactly one optimizer step on the
whole chunk (no clipping, no epochs), as advantage actor-critic does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamrl import Pipeline
from streamrl.loader import load_module

ppo = load_module(Path(__file__).with_name("ppo_cartpole.py"))


@dataclass
class Config(ppo.Config):  # type: ignore[name-defined,misc]
    algorithm: str = "a2c"
    """a2c: one step of the advantage actor-critic loss per chunk."""
    frames_per_chunk: int = 128
    """Frames per chunk = per update (num_envs x 16 steps)."""
    lr: float = 1e-3
    """Adam learning rate."""
    entropy_coef: float = 0.01
    """Entropy bonus coefficient."""
    max_policy_lag: int = 0
    """Strictly on-policy: each chunk is collected with the weights of the last update."""


def build(cfg: Config) -> Pipeline:
    return ppo.build(cfg)  # type: ignore[no-any-return]
