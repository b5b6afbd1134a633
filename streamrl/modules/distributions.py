"""Distributions for continuous actions, usable as ``distribution_class`` of a probabilistic actor.

::

    dist = TanhNormal(loc, scale, low=-2.0, high=2.0)     # loc, scale: [batch, n]; actions in [-2, 2]^n
    action = dist.rsample()                               # reparameterised: gradients reach loc and scale
    dist.log_prob(action)                                 # [batch]: the n action dims form one event
    action, log_prob = dist.rsample_and_log_prob()        # log-density of the draw itself (exact when saturated)
    dist.deterministic_sample                             # low + (high - low) * (tanh(loc) + 1) / 2
    IndependentNormal(loc, scale).log_prob(x)             # unsquashed, for actions without bounds

``TanhNormal`` draws ``x ~ Normal(loc, scale)`` and returns ``a = mid + half * tanh(x)`` with ``mid = (high +
low) / 2`` and ``half = (high - low) / 2``. By the change of variables its log-density is::

    log p(a) = log Normal(x; loc, scale) - sum_i [log(1 - tanh(x_i)^2) + log half_i],    x = atanh((a - mid) / half)

The last ``event_dims`` dims of ``loc`` are one event (summed in ``log_prob``), so a ``[batch, n]`` action has
a ``[batch]`` log-probability, as an actor's ``sample_log_prob`` needs. In float32, ``tanh`` rounds to exactly
±1 once ``|x|`` passes about 9, so ``a`` can equal a bound. ``log_prob`` stays finite there: it clamps
``(a - mid) / half`` into ``[-1 + eps, 1 - eps]`` (``eps`` of the dtype) before ``atanh``, and computes
``log(1 - tanh(x)^2)`` as ``2 * (log 2 - x - softplus(-2x))``. That clamp changes the value only for such
saturated actions; scoring the draw exactly needs its pre-``tanh`` value, which ``rsample_and_log_prob`` uses
(the probabilistic actor calls it when it samples) and which ``log_prob`` reuses when it is given the very
tensor that the latest ``rsample`` returned (a SAC-style ``a = dist.rsample(); dist.log_prob(a)``).

``NormalParamExtractor`` (``tensordict.nn``, exported as ``streamrl.NormalParamExtractor``) splits a network's
``2n`` outputs into ``loc`` and a positive ``scale`` for these distributions.
"""

from __future__ import annotations

import math

import torch
from torch import distributions as D
from torch.distributions import constraints

_MEAN_POINTS = 128  # quantile points of the estimate behind TanhNormal.mean
_Shape = torch.Size | list[int] | tuple[int, ...]


class TanhNormal(D.Distribution):
    """A normal squashed by ``tanh`` and mapped onto ``[low, high]``; see the module docstring for the maths.

    ``low`` and ``high`` are scalars or tensors broadcasting to the event shape (finite, ``low < high``).

    - ``rsample`` / ``sample``: ``mid + half * tanh(x)`` for ``x ~ Normal(loc, scale)``; within ``[low, high]``.
    - ``log_prob``: finite everywhere in ``[low, high]``, bounds included.
    - ``mode`` and ``deterministic_sample`` (what ``InteractionType.MODE`` and ``DETERMINISTIC`` read):
      ``mid + half * tanh(loc)``, the image of the normal's mode. The squashed density's own mode differs from
      it when ``scale`` is large (the mass piles up at the bounds); this is the action a deterministic policy
      wants.
    - ``mean`` (what ``InteractionType.MEAN`` reads): ``E[a]`` estimated by averaging ``tanh`` over 128 normal
      quantiles ``loc + scale * Phi^-1((k + 1/2) / 128)``. Deterministic and differentiable; checked against
      numerical integration, its error is below ``1.5e-3 * half`` for any ``loc`` and ``scale <= 10``.
    - ``entropy``: not implemented (it has no closed form); SAC-style losses use ``-log_prob`` of a sample.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        low: float | torch.Tensor = -1.0,
        high: float | torch.Tensor = 1.0,
        *,
        event_dims: int = 1,
        validate_args: bool | None = None,
    ) -> None:
        self.normal = D.Independent(D.Normal(loc, scale, validate_args=False), event_dims)
        self.loc = self.normal.base_dist.loc
        self.scale = self.normal.base_dist.scale
        self.low = torch.as_tensor(low, dtype=loc.dtype, device=loc.device)
        self.high = torch.as_tensor(high, dtype=loc.dtype, device=loc.device)
        self._mid = (self.high + self.low) / 2
        self._half = (self.high - self.low) / 2
        self._event_dims = event_dims
        self._last_draw: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, a) of the latest rsample
        super().__init__(self.normal.batch_shape, self.normal.event_shape, validate_args=validate_args)
        if self._validate_args and not bool((self._half > 0).all() & torch.isfinite(self._half).all()):
            raise ValueError(f"TanhNormal: needs finite bounds with low < high, got low={low}, high={high}; "
                             f"for actions without bounds use IndependentNormal")

    @constraints.dependent_property(is_discrete=False)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.interval(self.low, self.high), self._event_dims)

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return self._mid + self._half * torch.tanh(x)

    def _log_abs_det_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_i log |da_i / dx_i|`` over the event dims: ``log(1 - tanh(x)^2) + log half``, stably."""
        per_dim = 2.0 * (math.log(2.0) - x - torch.nn.functional.softplus(-2.0 * x)) + self._half.log()
        return per_dim.sum(tuple(range(-self._event_dims, 0))) if self._event_dims else per_dim

    def rsample(self, sample_shape: _Shape = ()) -> torch.Tensor:
        x = self.normal.rsample(sample_shape)
        action = self._squash(x)
        self._last_draw = (x, action)
        return action

    def sample(self, sample_shape: _Shape = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample_and_log_prob(self, sample_shape: _Shape = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample and its log-density scored from the action, as a learner will rescore it.

        This is what an actor records as ``sample_log_prob``. A stored action reaches the learner as a copy, which
        :meth:`log_prob` scores through ``atanh`` of the clamped action; scoring the record the same way makes the
        PPO ratio exactly 1 before the first update, even for actions ``tanh`` rounded to a bound (scoring those
        from the pre-``tanh`` draw instead put 2 % of the ratios of a policy with ``loc=7`` outside the clip range).
        """
        action = self.rsample(sample_shape)
        return action, self._log_prob_of(self._atanh(action))

    def _atanh(self, value: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(value.dtype).eps
        return torch.atanh(((value - self._mid) / self._half).clamp(-1.0 + eps, 1.0 - eps))

    def _log_prob_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.normal.log_prob(x) - self._log_abs_det_jacobian(x)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Scored exactly from the pre-``tanh`` draw when ``value`` is the tensor :meth:`rsample` just returned
        (SAC's actor loss), else through ``atanh`` of the action clamped inside the bounds."""
        draw = self._last_draw
        return self._log_prob_of(draw[0] if draw is not None and value is draw[1] else self._atanh(value))

    @property
    def mode(self) -> torch.Tensor:
        return self._squash(self.loc)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.mode

    @property
    def mean(self) -> torch.Tensor:
        levels = (torch.arange(_MEAN_POINTS, dtype=self.loc.dtype, device=self.loc.device) + 0.5) / _MEAN_POINTS
        x = self.loc.unsqueeze(-1) + self.scale.unsqueeze(-1) * torch.special.ndtri(levels)
        return self._mid + self._half * torch.tanh(x).mean(-1)


class IndependentNormal(D.Independent):
    """A normal whose last ``event_dims`` dims form one event: ``log_prob`` sums them (``[batch, n] -> [batch]``).

    For actions without bounds (A2C/PPO on an ``Unbounded`` spec). ``deterministic_sample``, ``mode`` and
    ``mean`` are ``loc``; ``entropy`` is the closed form, summed over the event dims.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, *, event_dims: int = 1,
                 validate_args: bool | None = None) -> None:
        super().__init__(D.Normal(loc, scale, validate_args=validate_args), event_dims, validate_args=validate_args)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.base_dist.loc
