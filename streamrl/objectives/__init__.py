"""Objectives: losses (DQN, DDPG, TD3, SAC, PPO, A2C, REINFORCE), value estimators and target-network updaters.

::

    from streamrl.objectives import DQNLoss, SoftUpdate
    loss_fn = DQNLoss(actor, gamma=0.99)
    updater = SoftUpdate(loss_fn, tau=0.005)         # after each optimizer step: updater.step()

    from streamrl.objectives import GAE, ClipPPOLoss
    advantage = GAE(gamma=0.99, lmbda=0.95, value_network=critic)
    loss_fn = ClipPPOLoss(actor, critic)
    loss_fn.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)   # TorchRL's way: loss_fn.value_estimator

The functional forms (``gae``, ``td0_return``, ``td1_return``, ``td_lambda_return``) take time-major tensors.
Names are imported lazily (PEP 562): ``import streamrl.objectives`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

_EXPORTS: dict[str, str] = {
    "A2CLoss": "streamrl.objectives.ppo",
    "ClipPPOLoss": "streamrl.objectives.ppo",
    "DDPGLoss": "streamrl.objectives.actor_critic",
    "DQNLoss": "streamrl.objectives.dqn",
    "GAE": "streamrl.objectives.value",
    "HardUpdate": "streamrl.objectives.updaters",
    "LossKeys": "streamrl.objectives.ppo",
    "ReinforceLoss": "streamrl.objectives.ppo",
    "SACLoss": "streamrl.objectives.actor_critic",
    "SoftUpdate": "streamrl.objectives.updaters",
    "TD0Estimator": "streamrl.objectives.value",
    "TD1Estimator": "streamrl.objectives.value",
    "TD3Loss": "streamrl.objectives.actor_critic",
    "TDLambdaEstimator": "streamrl.objectives.value",
    "ValueEstimator": "streamrl.objectives.value",
    "ValueEstimators": "streamrl.objectives.value",
    "ValueKeys": "streamrl.objectives.value",
    "gae": "streamrl.objectives.value",
    "td0_return": "streamrl.objectives.value",
    "td1_return": "streamrl.objectives.value",
    "td_lambda_return": "streamrl.objectives.value",
}

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
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
        ValueEstimators,
        ValueKeys,
        gae,
        td0_return,
        td1_return,
        td_lambda_return,
    )


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
