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
from typing import NamedTuple

import numpy as np
import torch
from torch import distributions as D
from torch.distributions import constraints
from torch.distributions.utils import _standard_normal

_MEAN_POINTS = 128  # quantile points of the estimate behind TanhNormal.mean
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the constant of torch's Normal.log_prob, the same float
_LOG_2 = math.log(2.0)
_Shape = torch.Size | list[int] | tuple[int, ...]


class TanhBounds(NamedTuple):
    """``low`` and ``high`` as tensors, with what :class:`TanhNormal` derives from them: ``mid``, ``half`` and
    ``log(half)``. An actor computes them once (``ProbabilisticActor`` keeps them as buffers) and passes them as
    ``TanhNormal(loc, scale, bounds=...)``, so a distribution built at every call converts nothing."""

    low: torch.Tensor
    high: torch.Tensor
    mid: torch.Tensor
    half: torch.Tensor
    log_half: torch.Tensor

    @classmethod
    def of(cls, low: torch.Tensor, high: torch.Tensor) -> TanhBounds:
        """From tensor bounds (of one dtype and device); not checked."""
        mid, half = (high + low) / 2, (high - low) / 2
        return cls(low, high, mid, half, half.log())


def _bounds(low: float | torch.Tensor, high: float | torch.Tensor, like: torch.Tensor, *, check: bool) -> TanhBounds:
    """``low`` and ``high`` as :class:`TanhBounds` of ``like``'s dtype and device.

    Host bounds (numbers, lists, arrays) are checked here, with numpy; tensor bounds only when ``check`` (a
    ``validate_args=True`` distribution), since reading a device tensor on the host is a sync.
    """
    tensors = [b for b in (low, high) if isinstance(b, torch.Tensor)]
    host = [np.asarray(b, dtype=np.float64) for b in (low, high) if not isinstance(b, torch.Tensor)]
    if not tensors and not (np.isfinite(host[0]).all() and np.isfinite(host[1]).all() and (host[0] < host[1]).all()):
        raise ValueError(f"TanhNormal: needs finite bounds with low < high, got low={low}, high={high}; "
                         f"for actions without bounds use IndependentNormal")
    bounds = TanhBounds.of(torch.as_tensor(low, dtype=like.dtype, device=like.device),
                           torch.as_tensor(high, dtype=like.dtype, device=like.device))
    if tensors and check and not bool((bounds.half > 0).all() & torch.isfinite(bounds.half).all()):
        raise ValueError(f"TanhNormal: needs finite bounds with low < high, got low={low}, high={high}; "
                         f"for actions without bounds use IndependentNormal")
    return bounds


class TanhNormal(D.Distribution):
    """A normal squashed by ``tanh`` and mapped onto ``[low, high]``; see the module docstring for the maths.

    ``low`` and ``high`` are scalars or tensors broadcasting to the event shape (finite, ``low < high``). Python
    numbers are checked always; tensors, and ``loc`` and ``scale``, only with ``validate_args=True``: the checks
    read tensors on the host, which a CUDA graph cannot do (``ProbabilisticActor`` checks its bounds once).
    ``bounds``, a :class:`TanhBounds` computed once (what ``ProbabilisticActor`` passes), replaces ``low`` and
    ``high``: the per-call conversions (five small ops) are then skipped.

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
        bounds: TanhBounds | None = None,
        event_dims: int = 1,
        validate_args: bool | None = None,
    ) -> None:
        if loc.shape != scale.shape:
            loc, scale = torch.broadcast_tensors(loc, scale)
        self.loc, self.scale = loc, scale
        if bounds is None:
            bounds = _bounds(low, high, loc, check=bool(validate_args))
        elif bounds.half.dtype != loc.dtype or bounds.half.device != loc.device:
            bounds = TanhBounds(*(b.to(dtype=loc.dtype, device=loc.device) for b in bounds))
        self.low, self.high, self._mid, self._half, self._log_half = bounds
        self._event_dims = event_dims
        self._last_draw: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, a) of the latest rsample
        cut = loc.dim() - event_dims
        # no value checks unless asked for (validate_args=True): they read tensors on the host, which a CUDA graph
        # cannot do, and cost more than the arithmetic on small batches
        super().__init__(loc.shape[:cut], loc.shape[cut:], validate_args=bool(validate_args))

    @property
    def normal(self) -> D.Independent:
        """The unsquashed ``Normal(loc, scale)`` with the event dims reinterpreted, as a torch distribution."""
        return D.Independent(D.Normal(self.loc, self.scale, validate_args=False), self._event_dims)

    @constraints.dependent_property(is_discrete=False)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.interval(self.low, self.high), self._event_dims)

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return self._mid + self._half * torch.tanh(x)

    def _log_abs_det_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_i log |da_i / dx_i|`` over the event dims: ``log(1 - tanh(x)^2) + log half``, stably."""
        per_dim = 2.0 * (_LOG_2 - x - torch.nn.functional.softplus(-2.0 * x)) + self._log_half
        return per_dim.sum(tuple(range(-self._event_dims, 0))) if self._event_dims else per_dim

    def _normal_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``Normal(loc, scale).log_prob(x)`` summed over the event dims, as torch computes it, without building
        the distribution objects."""
        per_dim = -((x - self.loc) ** 2) / (2 * self.scale**2) - self.scale.log() - _LOG_SQRT_2PI
        return per_dim.reshape(*per_dim.shape[:per_dim.dim() - self._event_dims], -1).sum(-1) \
            if self._event_dims else per_dim

    def rsample(self, sample_shape: _Shape = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        x = self.loc + _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device) * self.scale
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
        return self._normal_log_prob(x) - self._log_abs_det_jacobian(x)

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
    ``mean`` are ``loc``; ``entropy`` is the closed form, summed over the event dims. Arguments and samples are
    checked only with ``validate_args=True`` (the checks read tensors on the host, which a CUDA graph cannot do).
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, *, event_dims: int = 1,
                 validate_args: bool | None = False) -> None:
        super().__init__(D.Normal(loc, scale, validate_args=validate_args), event_dims, validate_args=validate_args)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.base_dist.loc
