"""Policy-gradient losses: clipped PPO, A2C, REINFORCE.

::

    estimator = GAE(gamma=0.99, lmbda=0.95, value_network=critic)
    loss_fn = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coef=1e-4)
    chunk = estimator(chunk)                       # advantage, value_target
    out = loss_fn(minibatch)                       # TensorDict: loss_objective, loss_critic, loss_entropy, loss
    out["loss"].backward()                         # loss is the sum of the loss_* entries
    out["entropy"], out["kl_approx"], out["clip_fraction"], out["ess"]   # diagnostics, no gradient

``actor`` is a :class:`tensordict.nn.ProbabilisticTensorDictSequential` (its ``get_dist(batch)`` gives the
current policy's distribution); ``critic`` a keyed module writing ``"state_value"`` ``[..., 1]``. The batch holds
``action``, ``advantage`` and ``value_target`` (``[..., 1]`` or per row), and for PPO ``sample_log_prob``, the
log-probability of the action under the policy that acted, recorded at collection. Log-probabilities and
entropies are summed over the action's dims (a ``Normal`` over a vector action is one distribution per row).

* ``ClipPPOLoss``: ``-mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))`` with
  ``ratio = exp(log_prob - sample_log_prob)``.
* ``A2CLoss``: ``-mean(log_prob * A)``, on-policy (no ratio).
* ``ReinforceLoss``: ``-mean(log_prob * A)`` with no entropy term; ``critic=None`` for no baseline (the
  advantage is then the return: ``TD1Estimator(gamma=..., value_network=None)``).

``loss_critic = critic_coef * mean(d(V(s), value_target))``, ``d`` the Huber (``"smooth_l1"``) or squared
(``"l2"``) error. ``loss_entropy = -entropy_coef * mean(entropy)``: the distribution's ``entropy()``, or the
one-sample estimate ``-log_prob(rsample())`` for distributions without one (a tanh-squashed normal).

From TorchRL: ``actor_network=``/``critic_network=`` are accepted for ``actor``/``critic``, ``*_key`` keywords
(``advantage_key="adv"``, ``value_target_key=...``) and ``loss.set_keys(advantage="adv")`` for the fields of
:class:`LossKeys`; ``gamma=`` is refused (the value estimator takes it).
``loss.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)`` builds that estimator over the loss's
critic as ``loss.value_estimator``, which you run on each chunk before the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torch.distributions import Distribution

from streamrl.errors import ConfigError, torchrl_names
from streamrl.objectives.value import ValueEstimator, ValueEstimators, ValueKeys, make_estimator


@dataclass(frozen=True)
class LossKeys:
    """Where the policy-gradient losses read; ``value`` is also the key ``critic`` writes."""

    action: NestedKey = "action"
    sample_log_prob: NestedKey = "sample_log_prob"
    advantage: NestedKey = "advantage"
    value_target: NestedKey = "value_target"
    value: NestedKey = "state_value"


_Init = TypeVar("_Init", bound=Callable[..., None])


def _key_arguments(owner: str) -> Callable[[_Init], _Init]:
    """Fold TorchRL's ``*_key`` keywords (``advantage_key="adv"``) into ``keys`` (``LossKeys(advantage="adv")``).

    A ``*_key`` keyword that names no :class:`LossKeys` field fails with the fields there are.
    """
    def decorate(init: _Init) -> _Init:
        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            renamed = {name.removesuffix("_key"): kwargs.pop(name) for name in list(kwargs) if name.endswith("_key")}
            if renamed:
                names = [f.name for f in fields(LossKeys)]
                unknown = sorted(set(renamed) - set(names))
                if unknown:
                    raise TypeError(f"{owner}: no key named {[f'{u}_key' for u in unknown]}; the keys it reads are "
                                    f"LossKeys fields {names}: pass keys=LossKeys({unknown[0]}=...) for one of them")
                kwargs["keys"] = replace(kwargs.get("keys", LossKeys()), **renamed)
            init(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _gamma(gamma: Any) -> str:
    return (f"the policy-gradient losses take no gamma (got gamma={gamma}): the discount belongs to the value "
            f"estimator that writes advantage and value_target: GAE(gamma={gamma}, lmbda=..., value_network=critic)")


_TORCHRL_NAMES: dict[str, str] = {"actor_network": "actor", "critic_network": "critic"}


def _per_row(x: torch.Tensor, batch: TensorDictBase) -> torch.Tensor:
    """``x`` (batch dims first) summed over its other dims: one number per row of ``batch``."""
    if x.shape == batch.batch_size:  # already one per row (a log-probability over an event): skip two ops
        return x
    return x.reshape(*batch.batch_size, -1).sum(-1)


def entropy(dist: Distribution) -> torch.Tensor:
    """``dist.entropy()``, or the one-sample estimate ``-log_prob(rsample())`` where it is not implemented."""
    try:
        return dist.entropy()
    except NotImplementedError:
        if not dist.has_rsample:
            raise TypeError(
                f"{type(dist).__name__} implements neither entropy() nor rsample(): an entropy bonus needs one of "
                f"them (or entropy_bonus=False)") from None
        return -dist.log_prob(dist.rsample())


class _PolicyGradientLoss(nn.Module):
    """What the losses share: log-probabilities, advantage, entropy bonus, critic loss, the output."""

    def __init__(
        self,
        actor: ProbabilisticTensorDictSequential,
        critic: TensorDictModuleBase | None,
        *,
        entropy_bonus: bool,
        entropy_coef: float,
        critic_coef: float,
        loss_critic_type: Literal["smooth_l1", "l2"],
        normalize_advantage: bool,
        keys: LossKeys,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if loss_critic_type not in ("smooth_l1", "l2"):
            raise ConfigError(f"{name}: loss_critic_type must be 'smooth_l1' or 'l2', got {loss_critic_type!r}")
        if entropy_coef < 0 or critic_coef < 0:
            raise ConfigError(f"{name}: coefficients must be >= 0, got {entropy_coef=}, {critic_coef=}")
        self.actor = actor
        self.critic = critic
        self.entropy_bonus = entropy_bonus
        self.entropy_coef = entropy_coef
        self.critic_coef = critic_coef
        self.loss_critic_type = loss_critic_type
        self.normalize_advantage = normalize_advantage
        self.keys = keys
        self.value_estimator: ValueEstimator | None = None

    def make_value_estimator(self, value_type: ValueEstimators | str = ValueEstimators.GAE,
                             **hyperparams: Any) -> _PolicyGradientLoss:
        """TorchRL's ``loss_fn.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)``: builds the
        keyed estimator over this loss's critic, writing the keys the loss reads, as ``loss_fn.value_estimator``.

        Any of ``ValueEstimators`` (``TD0``, ``TD1``, ``TDLambda``, ``GAE``); hyperparameters ``gamma`` (0.99),
        ``lmbda`` (0.95; TDLambda, GAE) and ``average_gae`` (GAE). The loss does not run it: estimates need whole
        chunks in time order, minibatches are shuffled rows, so run it on each chunk first
        (``chunk = loss_fn.value_estimator(chunk)``; in a pipeline, ``AdvantageStage("gae", loss_fn.value_estimator)``).
        Returns the loss.
        """
        keys = ValueKeys(value=self.keys.value, advantage=self.keys.advantage, value_target=self.keys.value_target)
        self.value_estimator = make_estimator(type(self).__name__, value_type, hyperparams,
                                              value_network=self.critic, keys=keys)
        return self

    def set_keys(self, **keys: NestedKey) -> _PolicyGradientLoss:
        """Rename the keys the loss reads (TorchRL's ``loss.set_keys(advantage="adv")``): fields of
        :class:`LossKeys`. Returns the loss."""
        names = [f.name for f in fields(LossKeys)]
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__}.set_keys: no key named {unknown}; the keys are {names}")
        self.keys = replace(self.keys, **keys)
        return self

    def objective(self, batch: TensorDictBase, log_prob: torch.Tensor,
                  advantage: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss_objective, diagnostics)`` from per-row log-probabilities and advantages: here the plain
        policy gradient ``-mean(log_prob * advantage)``."""
        return -(log_prob * advantage).mean(), {}

    def forward(self, batch: TensorDictBase) -> TensorDict:
        # No host reads on this path (a CUDA graph replays it): only shapes and Python settings pick branches.
        keys = self.keys
        dist = self.actor.get_dist(batch.copy())  # a copy: loc, scale... (and their graphs) stay out of batch
        log_prob = _per_row(dist.log_prob(batch.get(keys.action)), batch)
        advantage = batch.get(keys.advantage, None)
        if advantage is None:
            raise KeyError(f"{type(self).__name__}: the batch has no {keys.advantage!r} (the advantage): run a value "
                           f"estimator such as GAE (or loss_fn.value_estimator, after make_value_estimator) on the "
                           f"chunk first, or name the key it writes with "
                           f"keys=LossKeys(advantage=...) (TorchRL's advantage_key=)")
        advantage = advantage.reshape(batch.batch_size)
        if self.normalize_advantage and advantage.numel() > 1:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        loss_objective, diagnostics = self.objective(batch, log_prob, advantage)
        losses = {"loss_objective": loss_objective}
        total = loss_objective  # summed as they come: no stack of a list (a copy and a kernel less)
        if self.critic is not None:
            losses["loss_critic"] = loss_critic = self.critic_coef * self._critic_distance(batch)
            total = total + loss_critic
        if self.entropy_bonus:
            mean_entropy = _per_row(entropy(dist), batch).mean()
            losses["loss_entropy"] = loss_entropy = -self.entropy_coef * mean_entropy
            total = total + loss_entropy
            diagnostics["entropy"] = mean_entropy
        return TensorDict({**losses, "loss": total, **{k: v.detach() for k, v in diagnostics.items()}},
                          batch_size=[])

    def _critic_distance(self, batch: TensorDictBase) -> torch.Tensor:
        assert self.critic is not None
        value = self.critic(batch.copy()).get(self.keys.value).reshape(batch.batch_size)
        target = batch.get(self.keys.value_target).reshape(batch.batch_size).to(value.dtype)
        if self.loss_critic_type == "smooth_l1":
            return nn.functional.smooth_l1_loss(value, target)
        return nn.functional.mse_loss(value, target)


class ClipPPOLoss(_PolicyGradientLoss):
    """Clipped PPO; see the module docstring.

    Diagnostics: ``kl_approx`` (``mean(ratio - 1 - log ratio)``, an estimate of KL(acting || current) >= 0),
    ``clip_fraction`` (rows with ``|ratio - 1| > clip_epsilon``), ``ess`` (effective sample size of the ratios
    as a fraction of the batch, ``sum(ratio)^2 / (n * sum(ratio^2))``), ``entropy`` (with the bonus).
    """

    @_key_arguments("ClipPPOLoss")
    @torchrl_names("ClipPPOLoss", accept=_TORCHRL_NAMES, convert={"gamma": _gamma})
    def __init__(
        self,
        actor: ProbabilisticTensorDictSequential,
        critic: TensorDictModuleBase,
        *,
        clip_epsilon: float = 0.2,
        entropy_bonus: bool = True,
        entropy_coef: float = 0.01,
        critic_coef: float = 1.0,
        loss_critic_type: Literal["smooth_l1", "l2"] = "smooth_l1",
        normalize_advantage: bool = False,
        keys: LossKeys = LossKeys(),
    ) -> None:
        super().__init__(actor, critic, entropy_bonus=entropy_bonus, entropy_coef=entropy_coef,
                         critic_coef=critic_coef, loss_critic_type=loss_critic_type,
                         normalize_advantage=normalize_advantage, keys=keys)
        if not 0.0 < clip_epsilon < 1.0:
            raise ConfigError(f"ClipPPOLoss: clip_epsilon must be in (0, 1), got {clip_epsilon}")
        self.clip_epsilon = clip_epsilon

    def objective(self, batch: TensorDictBase, log_prob: torch.Tensor,
                  advantage: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acting = batch.get(self.keys.sample_log_prob, None)
        if acting is None:
            raise KeyError(f"ClipPPOLoss: the batch has no {self.keys.sample_log_prob!r} (the log-probability of "
                           f"the action under the acting policy): record it at collection, or name the key the "
                           f"actor writes with keys=LossKeys(sample_log_prob=...)")
        log_ratio = log_prob - _per_row(acting, batch)
        ratio = log_ratio.exp()
        eps = self.clip_epsilon
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1.0 - eps, 1.0 + eps) * advantage)
        with torch.no_grad():
            diagnostics = {
                "kl_approx": (ratio - 1.0 - log_ratio).mean(),
                "clip_fraction": ((ratio - 1.0).abs() > eps).float().mean(),
                "ess": ratio.sum() ** 2 / (ratio.numel() * (ratio**2).sum()),
            }
        return -surrogate.mean(), diagnostics


class A2CLoss(_PolicyGradientLoss):
    """Advantage actor-critic; see the module docstring. Diagnostics: ``entropy`` (with the bonus)."""

    @_key_arguments("A2CLoss")
    @torchrl_names("A2CLoss", accept=_TORCHRL_NAMES, convert={"gamma": _gamma})
    def __init__(
        self,
        actor: ProbabilisticTensorDictSequential,
        critic: TensorDictModuleBase,
        *,
        entropy_bonus: bool = True,
        entropy_coef: float = 0.01,
        critic_coef: float = 1.0,
        loss_critic_type: Literal["smooth_l1", "l2"] = "smooth_l1",
        normalize_advantage: bool = False,
        keys: LossKeys = LossKeys(),
    ) -> None:
        super().__init__(actor, critic, entropy_bonus=entropy_bonus, entropy_coef=entropy_coef,
                         critic_coef=critic_coef, loss_critic_type=loss_critic_type,
                         normalize_advantage=normalize_advantage, keys=keys)


class ReinforceLoss(_PolicyGradientLoss):
    """REINFORCE, with a learned baseline when ``critic`` is given; see the module docstring."""

    @_key_arguments("ReinforceLoss")
    @torchrl_names("ReinforceLoss", accept=_TORCHRL_NAMES, convert={"gamma": _gamma})
    def __init__(
        self,
        actor: ProbabilisticTensorDictSequential,
        critic: TensorDictModuleBase | None = None,
        *,
        critic_coef: float = 1.0,
        loss_critic_type: Literal["smooth_l1", "l2"] = "smooth_l1",
        normalize_advantage: bool = False,
        keys: LossKeys = LossKeys(),
    ) -> None:
        super().__init__(actor, critic, entropy_bonus=False, entropy_coef=0.0, critic_coef=critic_coef,
                         loss_critic_type=loss_critic_type, normalize_advantage=normalize_advantage, keys=keys)
