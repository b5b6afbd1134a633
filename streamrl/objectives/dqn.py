"""The DQN loss: double DQN, Huber or MSE, a target network owned by the loss.

::

    loss_fn = DQNLoss(actor, gamma=0.99, double_dqn=True, loss="smooth_l1")
    out = loss_fn(batch)            # TensorDict: loss, td_error [B], q_value (mean), target_value (mean)
    out["loss"].backward()
    SoftUpdate(loss_fn, tau=0.01).step()    # or HardUpdate(loss_fn, every=500)
    loss_fn.make_value_estimator(ValueEstimators.TD0, gamma=0.9)   # TorchRL's way to set gamma

The batch holds ``observation``, ``action`` (index or one-hot), and under ``next``: ``observation``, ``reward`` [B, 1],
``terminated`` [B, 1]. The TD target is ``r + gamma^n * (1 - terminated) * Q_target(s', a*)`` where ``a*`` is the
online network's argmax (double DQN) or the target's (plain DQN). Truncated episodes bootstrap: only
``terminated`` cuts the return. ``n`` is 1 unless the batch carries ``("next", "gamma")`` (n-step returns).
A batch with importance weights ``weight`` [B] (a ``PrioritizedSampler``'s) gives ``mean(weight * elementwise loss)``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from streamrl.errors import ConfigError, keeps_targets, torchrl_names
from streamrl.modules.actors import QValueActor
from streamrl.objectives.value import ValueEstimators, one_step_gamma


class DQNLoss(nn.Module):
    """Temporal-difference loss for a Q-value network; see the module docstring.

    From TorchRL: ``loss_function=`` is accepted as ``loss=``; ``delay_value=True`` is accepted and changes nothing
    (the loss always has a target network), ``delay_value=False`` is refused.
    """

    @torchrl_names("DQNLoss", accept={"loss_function": "loss"}, convert={"delay_value": keeps_targets(
        "DQNLoss always keeps a target network", "delay_value=True")})
    def __init__(
        self,
        value_network: QValueActor | nn.Module,
        *,
        gamma: float = 0.99,
        double_dqn: bool = True,
        loss: Literal["smooth_l1", "l2"] = "smooth_l1",
        in_key: str = "observation",
    ) -> None:
        super().__init__()
        if loss not in ("smooth_l1", "l2"):
            raise ConfigError(f"DQNLoss: loss must be 'smooth_l1' or 'l2', got {loss!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"DQNLoss: gamma must be in [0, 1], got {gamma}")
        net = value_network.value_net if isinstance(value_network, QValueActor) else value_network
        self.value_net = net
        self.target_value_net = copy.deepcopy(net).requires_grad_(False)
        self.gamma = gamma
        self.double_dqn = double_dqn
        self.loss_type = loss
        self.in_key = in_key

    def make_value_estimator(self, value_type: ValueEstimators | str = ValueEstimators.TD0,
                             **hyperparams: Any) -> DQNLoss:
        """TorchRL's ``loss_fn.make_value_estimator(gamma=0.99)``: sets the discount of the one-step target (only
        ``ValueEstimators.TD0`` applies; ``gamma`` defaults to the current one). Returns the loss."""
        self.gamma = one_step_gamma("DQNLoss", value_type, hyperparams, self.gamma)
        return self

    def target_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(online, target) parameter pairs, for target updaters."""
        return list(zip(self.value_net.parameters(), self.target_value_net.parameters(), strict=True))

    def forward(self, batch: TensorDictBase) -> TensorDict:
        obs = batch.get(self.in_key)
        next_obs = batch.get(("next", self.in_key))
        action = batch.get("action").long()
        reward = batch.get(("next", "reward")).reshape(-1)
        terminated = batch.get(("next", "terminated")).reshape(-1).to(reward.dtype)
        gamma = batch.get(("next", "gamma"), None)
        discount = gamma.reshape(-1) if gamma is not None else self.gamma
        if self.double_dqn:  # one forward over [obs; next_obs]: small nets are dominated by per-call costs
            both = self.value_net(torch.cat([obs, next_obs]))
            q_all, q_next_online = both[: obs.shape[0]], both[obs.shape[0]:].detach()
        else:
            q_all = self.value_net(obs)
        if action.dim() == 2 and action.shape[-1] == q_all.shape[-1]:  # one-hot actions (a OneHot action spec)
            action = action.argmax(-1)
        q = q_all.gather(-1, action.reshape(-1, 1)).squeeze(-1)
        with torch.no_grad():
            target_all = self.target_value_net(next_obs)
            if self.double_dqn:
                best = q_next_online.argmax(-1, keepdim=True)
            else:
                best = target_all.argmax(-1, keepdim=True)
            next_q = target_all.gather(-1, best).squeeze(-1)
            target = reward + discount * (1.0 - terminated) * next_q
        if self.loss_type == "smooth_l1":
            elementwise = nn.functional.smooth_l1_loss(q, target, reduction="none")
        else:
            elementwise = nn.functional.mse_loss(q, target, reduction="none")
        weight = batch.get("weight", None)  # importance weights of a PrioritizedSampler
        loss = (elementwise * weight.reshape(-1)).mean() if weight is not None else elementwise.mean()
        td_error = (q.detach() - target).abs()
        return TensorDict(
            {"loss": loss, "td_error": td_error, "q_value": q.detach().mean(), "target_value": target.mean()},
            batch_size=[],
        )
