"""Actor-critic losses for continuous actions: DDPG, TD3 and SAC, with target networks owned by the loss.

::

    loss_fn = DDPGLoss(actor, critic, gamma=0.99)                          # Actor + one Q critic
    loss_fn = TD3Loss(actor, [critic1, critic2], gamma=0.99, action_spec=env.action_spec)
    loss_fn = SACLoss(prob_actor, [critic1, critic2], gamma=0.99)          # alpha tuned to entropy -action_dim
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-4)            # ONE optimizer for every network
    out = loss_fn(batch)        # loss_actor, the critic term, SAC: loss_alpha; loss (their sum), diagnostics
    out["loss"].backward()
    optimizer.step()
    SoftUpdate(loss_fn, tau=0.005).step()                                  # target networks follow

An actor is a keyed module (``tensordict.nn``) reading the observation and writing ``"action"`` (DDPG, TD3: a
deterministic one such as :class:`~streamrl.Actor`), or for SAC a probabilistic one whose ``get_dist(td)``
returns a distribution with ``rsample`` and ``log_prob`` (a :class:`~streamrl.ProbabilisticActor` over a
``TanhNormal``). A critic reads the observation and ``"action"`` and writes ``"state_action_value"`` ``[B, 1]``.
TD3 and SAC take twin critics: a list of critics, or one ensemble module whose ``"state_action_value"`` is
``[B, K]`` with ``K >= 2``. Build lazy networks (once through a batch) before the loss copies them into targets.
TorchRL's ``actor_network=`` and ``value_network=`` (DDPG) or ``qvalue_network=`` (TD3, SAC) are accepted for
``actor`` and ``critic``; ``delay_actor``/``delay_value`` True changes nothing (targets are always kept).
``loss_fn.make_value_estimator(ValueEstimators.TD0, gamma=0.99)`` sets ``gamma`` (TD0 is the one estimator).

The batch holds ``observation``, ``action`` and under ``next``: ``observation``, ``reward`` ``[B, 1]``,
``terminated`` ``[B, 1]``. Targets are ``r + gamma^n * (1 - terminated) * V(s')``: terminated transitions do
not bootstrap, truncated ones do. ``n`` is 1 unless the batch carries ``("next", "gamma")`` (n-step returns).
Importance weights ``weight`` ``[B]`` (a ``PrioritizedSampler``'s) weight the critic regression; ``td_error``
``[B]`` (the largest ``|Q_k - target|`` over the critics) is what ``PriorityUpdate`` reads.

**One optimizer, one backward.** The learner stage backpropagates ``out["loss"]`` through one optimizer, so
every loss term has gradients for its own parameters only, and the sum behaves as separate updates:

* The critic term (``loss_value`` in DDPG, ``loss_qvalue`` in TD3 and SAC, TorchRL's names) reaches the
  critics alone: targets are computed without gradients, from target networks.
* ``loss_actor`` reaches the actor alone: it evaluates the critics with *detached* copies of their parameters
  (``torch.func.functional_call``), so the gradient flows through the action into the actor and stops there.
* ``loss_alpha`` (SAC) reaches ``log_alpha`` alone: it uses detached log-probabilities; the actor term uses a
  detached alpha.

Adam keeps per-parameter state, so one Adam over the sum equals one Adam per network with the same settings.
Different learning rates are parameter groups::

    torch.optim.Adam([{"params": loss_fn.actor.parameters(), "lr": 1e-4},
                      {"params": loss_fn.critics.parameters(), "lr": 1e-3}])

The learner's ``max_grad_norm`` clips the norm over all parameters together; leave it ``None`` to keep the
networks independent. TD3's delayed actor updates make ``loss_actor`` a constant zero (no graph) on the other
steps, so the actor's gradients stay ``None`` and the optimizer skips it (a zero term *with* a graph would give
zero gradients, which Adam still steps on through its momentum).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torch.func import functional_call

from streamrl.envs.specs import Bounded
from streamrl.errors import ConfigError, keeps_targets, torchrl_names
from streamrl.objectives.value import ValueEstimators, one_step_gamma

LossFunction = Literal["l2", "smooth_l1", "l1"]
_ELEMENTWISE = {"l2": nn.functional.mse_loss, "smooth_l1": nn.functional.smooth_l1_loss, "l1": nn.functional.l1_loss}
VALUE_KEY = "state_action_value"
_DELAYED = keeps_targets("the actor-critic losses always keep target networks", "delay_actor=True, delay_value=True")


def _check_built(module: nn.Module, what: str, loss: str) -> None:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise ConfigError(f"{loss}: the {what} has uninitialized (lazy) parameters, so its target copy would start "
                          f"from different weights; run one batch through it (or give MLP in_features=) first")


class _ActorCriticLoss(nn.Module):
    """The shared parts: critics and their targets, the batch's inputs, bootstrapped targets, the critic loss."""

    min_critics = 1
    max_critics: int | None = None

    def __init__(self, actor: TensorDictModuleBase, critic: TensorDictModuleBase | Sequence[TensorDictModuleBase],
                 *, gamma: float, loss_function: LossFunction, target_actor: bool) -> None:
        super().__init__()
        name = type(self).__name__
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"{name}: gamma must be in [0, 1], got {gamma}")
        if loss_function not in _ELEMENTWISE:
            raise ConfigError(f"{name}: loss_function must be one of {sorted(_ELEMENTWISE)}, got {loss_function!r}")
        critics = list(critic) if isinstance(critic, Sequence) else [critic]
        if not critics or (self.max_critics is not None and len(critics) > self.max_critics):
            raise ConfigError(f"{name}: expected {self.max_critics or 'one or more'} critic(s), got {len(critics)}")
        _check_built(actor, "actor", name)
        for c in critics:
            _check_built(c, "critic", name)
        self.actor = actor
        self.critics = nn.ModuleList(critics)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.target_actor = copy.deepcopy(actor).requires_grad_(False) if target_actor else None
        self.gamma = gamma
        self.loss_function = loss_function
        in_keys = {key for module in (actor, *critics) for key in module.in_keys}
        self.obs_keys = sorted(in_keys - {"action"}, key=str)

    def make_value_estimator(self, value_type: ValueEstimators | str = ValueEstimators.TD0,
                             **hyperparams: Any) -> _ActorCriticLoss:
        """TorchRL's ``loss_fn.make_value_estimator(gamma=0.99)``: sets the discount of the one-step target (only
        ``ValueEstimators.TD0`` applies; ``gamma`` defaults to the current one). Returns the loss."""
        self.gamma = one_step_gamma(type(self).__name__, value_type, hyperparams, self.gamma)
        return self

    def target_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(online, target) parameter pairs (critics, then the actor where it has a target), for target updaters."""
        pairs: list[tuple[nn.Parameter, torch.Tensor]] = list(
            zip(self.critics.parameters(), self.target_critics.parameters(), strict=True))
        if self.target_actor is not None:
            pairs += zip(self.actor.parameters(), self.target_actor.parameters(), strict=True)
        return pairs

    def _inputs(self, batch: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """The observation keys of ``s`` and ``s'`` as new TensorDicts (modules write into these, not the batch)."""
        return batch.select(*self.obs_keys), batch.get("next").select(*self.obs_keys)

    def _q(self, critics: nn.ModuleList, td: TensorDictBase, *, frozen: bool = False) -> torch.Tensor:
        """Q-values ``[N, K]`` of every critic (``frozen``: with detached parameters, no gradient to the critic)."""
        values = []
        for critic in critics:
            if frozen:
                params = {n: p.detach() for n, p in critic.named_parameters()}
                out = functional_call(critic, params, (td,))
            else:
                out = critic(td)
            value = out.get(VALUE_KEY)
            values.append(value.reshape(-1, value.shape[-1]))
        q = torch.cat(values, dim=-1)
        if q.shape[-1] < self.min_critics or (self.max_critics is not None and q.shape[-1] > self.max_critics):
            expected = "1" if self.max_critics == 1 else f"at least {self.min_critics}"
            raise ValueError(f"{type(self).__name__}: expected {expected} Q-value(s) per row, the critics gave "
                             f"{q.shape[-1]}; pass a list of critics each writing {VALUE_KEY!r} [B, 1], or one "
                             f"ensemble writing [B, K]")
        return q

    def _target(self, batch: TensorDictBase, next_value: torch.Tensor) -> torch.Tensor:
        """``r + gamma^n * (1 - terminated) * next_value``, ``[N]``."""
        reward = batch.get(("next", "reward")).reshape(-1)
        terminated = batch.get(("next", "terminated")).reshape(-1).to(reward.dtype)
        gamma = batch.get(("next", "gamma"), None)
        discount = gamma.reshape(-1) if gamma is not None else self.gamma
        return reward + discount * (1.0 - terminated) * next_value

    def _critic_loss(self, batch: TensorDictBase, q: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over critics of the (importance-weighted) mean regression loss; and ``td_error`` ``[N]``."""
        elementwise = _ELEMENTWISE[self.loss_function](q, target.unsqueeze(-1).expand_as(q), reduction="none")
        weight = batch.get("weight", None)
        if weight is not None:
            elementwise = elementwise * weight.reshape(-1, 1)
        td_error = (q.detach() - target.unsqueeze(-1)).abs().amax(-1)
        return elementwise.mean(0).sum(), td_error

    def _batch_q(self, batch: TensorDictBase, obs: TensorDictBase) -> torch.Tensor:
        """Q-values ``[N, K]`` of the batch's own actions, with gradients for the critics."""
        return self._q(self.critics, obs.copy().set("action", batch.get("action")))


class DDPGLoss(_ActorCriticLoss):
    """Deep deterministic policy gradient: a target actor and critic; see the module docstring.

    ``loss_value = mean(w * l(Q(s, a), r + gamma (1 - term) Q'(s', mu'(s'))))`` with ``l`` the
    ``loss_function`` (``"l2"``: squared error); ``loss_actor = -mean(Q(s, mu(s)))`` with the critic frozen.
    Diagnostics: ``q_value`` and ``target_value`` (batch means), ``td_error`` ``[B]``.

    ::

        loss_fn = DDPGLoss(Actor(MLP(1, in_features=3), spec=env.action_spec),
                           ValueOperator(MLP(1, in_features=4), in_keys=["observation", "action"]), gamma=0.99)
    """

    max_critics = 1

    @torchrl_names("DDPGLoss", accept={"actor_network": "actor", "value_network": "critic"},
                   convert={"delay_actor": _DELAYED, "delay_value": _DELAYED})
    def __init__(self, actor: TensorDictModuleBase, critic: TensorDictModuleBase, *, gamma: float = 0.99,
                 loss_function: LossFunction = "l2") -> None:
        super().__init__(actor, critic, gamma=gamma, loss_function=loss_function, target_actor=True)

    def forward(self, batch: TensorDictBase) -> TensorDict:
        assert self.target_actor is not None
        obs, next_obs = self._inputs(batch)
        with torch.no_grad():
            next_q = self._q(self.target_critics, self.target_actor(next_obs))[:, 0]
            target = self._target(batch, next_q)
        q = self._batch_q(batch, obs)
        loss_critic, td_error = self._critic_loss(batch, q, target)
        loss_actor = -self._q(self.critics, self.actor(obs.copy()), frozen=True).mean()
        return TensorDict({"loss": loss_actor + loss_critic, "loss_actor": loss_actor, "loss_value": loss_critic,
                           "q_value": q.detach().mean(), "target_value": target.mean(), "td_error": td_error},
                          batch_size=[])


class TD3Loss(_ActorCriticLoss):
    """Twin delayed DDPG: clipped double-Q targets, target-policy smoothing, delayed actor updates.

    The target action is ``clamp(mu'(s') + clamp(policy_noise * h * eps, -noise_clip * h, noise_clip * h), low,
    high)`` with ``eps ~ N(0, 1)`` and ``h = (high - low) / 2`` the action half-range of ``action_spec`` (so the
    defaults are the paper's ``0.2 * max_action`` and ``0.5 * max_action``). The target value is the minimum over
    the target critics; ``loss_qvalue`` sums every critic's regression loss. Every ``policy_delay``-th call
    computes ``loss_actor = -mean(Q_1(s, mu(s)))`` (first critic, frozen); other calls give a constant zero and
    leave the actor's gradients ``None``. The call count is saved in ``state_dict()``. Target networks follow
    whatever updater steps them: ``LearnerStage(target_update=SoftUpdate(...))`` steps after every update, where
    the paper moves them with the actor only (with ``tau = 0.005`` the difference is small).

    ::

        loss_fn = TD3Loss(actor, [critic1, critic2], gamma=0.99, action_spec=env.action_spec, policy_delay=2)
    """

    min_critics = 2
    low: torch.Tensor
    high: torch.Tensor

    @torchrl_names("TD3Loss", accept={"actor_network": "actor", "qvalue_network": "critic"})
    def __init__(self, actor: TensorDictModuleBase, critic: TensorDictModuleBase | Sequence[TensorDictModuleBase],
                 *, action_spec: Bounded, gamma: float = 0.99, policy_noise: float = 0.2, noise_clip: float = 0.5,
                 policy_delay: int = 2, loss_function: LossFunction = "l2") -> None:
        super().__init__(actor, critic, gamma=gamma, loss_function=loss_function, target_actor=True)
        if not isinstance(action_spec, Bounded):
            raise TypeError(f"TD3Loss: action_spec must be a Bounded spec (the env's action_spec), got {action_spec!r}")
        if policy_delay < 1 or policy_noise < 0 or noise_clip < 0:
            raise ConfigError(f"TD3Loss: needs policy_delay >= 1, policy_noise >= 0, noise_clip >= 0, got "
                              f"{policy_delay=}, {policy_noise=}, {noise_clip=}")
        self.register_buffer("low", action_spec.low.float().clone())
        self.register_buffer("high", action_spec.high.float().clone())
        self.policy_noise = policy_noise
        self.noise_clip = noise_clip
        self.policy_delay = policy_delay
        self.calls = 0

    def forward(self, batch: TensorDictBase) -> TensorDict:
        assert self.target_actor is not None
        self.calls += 1
        obs, next_obs = self._inputs(batch)
        with torch.no_grad():
            next_action = self.target_actor(next_obs).get("action")
            half_range = (self.high - self.low) / 2
            noise = torch.randn_like(next_action) * (self.policy_noise * half_range)
            noise = torch.maximum(torch.minimum(noise, self.noise_clip * half_range), -self.noise_clip * half_range)
            next_obs.set("action", torch.maximum(torch.minimum(next_action + noise, self.high), self.low))
            target = self._target(batch, self._q(self.target_critics, next_obs).amin(-1))
        q = self._batch_q(batch, obs)
        loss_critic, td_error = self._critic_loss(batch, q, target)
        if self.calls % self.policy_delay == 0:
            loss_actor = -self._q(self.critics, self.actor(obs.copy()), frozen=True)[:, 0].mean()
        else:
            loss_actor = torch.zeros((), device=q.device)
        return TensorDict({"loss": loss_actor + loss_critic, "loss_actor": loss_actor, "loss_qvalue": loss_critic,
                           "q_value": q.detach().mean(), "target_value": target.mean(), "td_error": td_error},
                          batch_size=[])

    def capture_key(self) -> bool:
        """Which update the next call makes (with the actor term or without): a captured learner keeps one graph
        of each, since the choice is made on the host."""
        return (self.calls + 1) % self.policy_delay == 0

    def replayed(self) -> None:
        """A captured update of this loss ran without calling :meth:`forward`: count the call it stands for."""
        self.calls += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


def _sample(actor: Any, td: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterized action and its log-probability ``[N]`` (per-dimension log-probs are summed)."""
    dist = actor.get_dist(td)
    action = dist.rsample()
    log_prob = dist.log_prob(action)
    if log_prob.shape == action.shape:
        log_prob = log_prob.sum(-1)
    return action, log_prob.reshape(-1)


class SACLoss(_ActorCriticLoss):
    """Soft actor-critic with twin critics and automatic entropy tuning; see the module docstring.

    With ``a' ~ pi(s')`` and ``log p'`` its log-probability: ``target = r + gamma (1 - term) (min_k Q'_k(s', a')
    - alpha log p')``; ``loss_qvalue = sum_k mean(w * l(Q_k(s, a), target))``. With ``a~ ~ pi(s)`` (reparameterized):
    ``loss_actor = mean(alpha log p~ - min_k Q_k(s, a~))`` (critics frozen, alpha detached) and ``loss_alpha =
    -mean(log_alpha * (log p~ + target_entropy))`` (log-prob detached), which raises alpha while the policy's
    entropy is below ``target_entropy`` (``"auto"``: ``-action_dim``, read from the batch's actions).
    ``fixed_alpha=True`` keeps ``alpha = alpha_init`` (``loss_alpha`` is 0). Diagnostics: ``q_value``,
    ``target_value``, ``td_error`` ``[B]``, ``alpha`` and ``entropy`` (``-mean(log p~)``).

    ::

        loss_fn = SACLoss(ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]),
                                             spec=env.action_spec),
                          [critic1, critic2], gamma=0.99, alpha_init=1.0)
    """

    min_critics = 2

    @torchrl_names("SACLoss", accept={"actor_network": "actor", "qvalue_network": "critic"})
    def __init__(self, actor: TensorDictModuleBase, critic: TensorDictModuleBase | Sequence[TensorDictModuleBase],
                 *, gamma: float = 0.99, alpha_init: float = 1.0, target_entropy: float | Literal["auto"] = "auto",
                 fixed_alpha: bool = False, loss_function: LossFunction = "l2") -> None:
        super().__init__(actor, critic, gamma=gamma, loss_function=loss_function, target_actor=False)
        if not hasattr(actor, "get_dist"):
            raise TypeError(f"SACLoss: the actor must be probabilistic (a ProbabilisticActor or "
                            f"ProbabilisticTensorDictSequential with get_dist), got {type(actor).__name__}")
        if alpha_init <= 0:
            raise ConfigError(f"SACLoss: alpha_init must be > 0, got {alpha_init}")
        if target_entropy != "auto" and not isinstance(target_entropy, (int, float)):
            raise ConfigError(f"SACLoss: target_entropy must be 'auto' or a number, got {target_entropy!r}")
        log_alpha = torch.tensor(math.log(alpha_init))
        if fixed_alpha:
            self.register_buffer("log_alpha", log_alpha)
        else:
            self.log_alpha = nn.Parameter(log_alpha)
        self.target_entropy = target_entropy
        self.fixed_alpha = fixed_alpha

    def forward(self, batch: TensorDictBase) -> TensorDict:
        obs, next_obs = self._inputs(batch)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = _sample(self.actor, next_obs.copy())
            next_q = self._q(self.target_critics, next_obs.set("action", next_action)).amin(-1)
            target = self._target(batch, next_q - alpha * next_log_prob)
        q = self._batch_q(batch, obs)
        loss_critic, td_error = self._critic_loss(batch, q, target)
        action, log_prob = _sample(self.actor, obs.copy())
        actor_q = self._q(self.critics, obs.copy().set("action", action), frozen=True).amin(-1)
        loss_actor = (alpha * log_prob - actor_q).mean()
        if self.fixed_alpha:
            loss_alpha = torch.zeros((), device=q.device)
        else:
            target_entropy = self.target_entropy
            if target_entropy == "auto":
                action_taken = batch.get("action")
                target_entropy = -float(action_taken[(0,) * batch.batch_dims].numel())
            loss_alpha = -(self.log_alpha * (log_prob.detach() + target_entropy)).mean()
        return TensorDict({"loss": loss_actor + loss_critic + loss_alpha, "loss_actor": loss_actor,
                           "loss_qvalue": loss_critic, "loss_alpha": loss_alpha, "q_value": q.detach().mean(),
                           "target_value": target.mean(), "td_error": td_error, "alpha": alpha,
                           "entropy": -log_prob.detach().mean()}, batch_size=[])
