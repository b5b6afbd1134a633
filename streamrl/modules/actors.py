"""Actors and critics: keyed modules (``tensordict.nn``) that read observations and write actions or values.

::

    actor = QValueActor(MLP(out_features=2))        # reads "observation"
    td = actor(TensorDict({"observation": obs}, [8]))
    td["action"], td["action_value"], td["chosen_action_value"]

    actor = QValueActor(net, in_key="pixels", spec=env.action_spec)   # one-hot actions for a OneHot spec

    # PPO / SAC: a network writes loc and scale, a TanhNormal over the spec's bounds samples the action
    net = TensorDictModule(nn.Sequential(MLP(2 * n_act), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(net, spec=env.action_spec)
    actor(td)                       # writes loc, scale, action and sample_log_prob (a sample: RANDOM by default)
    actor.get_dist(td).log_prob(td["action"])
    with set_interaction_type(InteractionType.DETERMINISTIC):
        actor(td)                   # the mode: low + (high - low) * (tanh(loc) + 1) / 2

    # DDPG / TD3: a deterministic actor and a Q-value critic
    actor = Actor(MLP(n_act), spec=env.action_spec)                # tanh, scaled to the spec's bounds
    critic = ValueOperator(MLP(1), in_keys=("observation", "action"))  # writes state_action_value
    value = ValueOperator(MLP(1))                                  # writes state_value
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModuleBase,
)
from torch import nn

from streamrl.envs.specs import Bounded, Categorical, OneHot, Spec
from streamrl.errors import ConfigError, torchrl_names
from streamrl.modules.distributions import TanhBounds, TanhNormal


class QValueActor(TensorDictModuleBase):
    """Greedy actor over a Q-value network: ``action = argmax_a Q(observation, a)``.

    Writes ``action_value`` (all Q-values, ``[..., n]``), ``chosen_action_value`` (``[..., 1]``, the Q-value of
    the action taken) and ``action``: an index when ``spec`` is a :class:`Categorical` (or no spec is given), a
    one-hot vector when it is a :class:`OneHot`, in the spec's dtype. ``one_hot=True``/``False`` overrides the
    form the spec implies. Ties go to the lowest index. TorchRL's ``in_keys=["pixels"]`` is accepted for
    ``in_key="pixels"`` (one key: the network takes one input).
    """

    @torchrl_names("QValueActor", accept={"in_keys": "in_key"})
    def __init__(
        self,
        value_net: nn.Module,
        *,
        in_key: str = "observation",
        spec: Categorical | OneHot | None = None,
        one_hot: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_key, str):
            keys = list(in_key)
            if len(keys) != 1 or not isinstance(keys[0], str):
                raise ConfigError(f"QValueActor reads one key (in_key=), got {keys}; to feed the network several "
                                  f"entries, concatenate them first (a transform) and pass that key")
            in_key = keys[0]
        if spec is not None and not isinstance(spec, (Categorical, OneHot)):
            raise TypeError(f"QValueActor: spec must be a Categorical or OneHot action spec, got {spec!r}")
        spec_one_hot = isinstance(spec, OneHot)
        self.value_net = value_net
        self.spec = spec
        self.one_hot = spec_one_hot if one_hot is None else one_hot
        # the spec's dtype applies when the action has the spec's form; otherwise the natural one (int64)
        self.action_dtype: torch.dtype | None = (
            spec.dtype if spec is not None and self.one_hot == spec_one_hot and spec.dtype != torch.int64 else None
        )
        self.in_keys = [in_key]  # type: ignore[assignment]
        self.out_keys = ["action", "action_value", "chosen_action_value"]  # type: ignore[assignment]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        values = self.value_net(tensordict.get(self.in_keys[0]))
        chosen, index = values.max(-1, keepdim=True)  # one kernel for both; first maximum on ties, as argmax
        action = nn.functional.one_hot(index.squeeze(-1), values.shape[-1]) if self.one_hot else index.squeeze(-1)
        if self.action_dtype is not None:
            action = action.to(self.action_dtype)
        return tensordict.update({"action": action, "action_value": values, "chosen_action_value": chosen})


def _single_key(out_keys: Sequence[str], owner: str) -> str:
    if isinstance(out_keys, str) or len(out_keys) != 1:
        raise ConfigError(f"{owner}: out_keys must hold one key, got {out_keys=}; "
                          f"write the other outputs with a TensorDictModule of their own")
    return out_keys[0]


def register_bounds(module: nn.Module, low: Any, high: Any) -> None:
    """``low``/``high`` as float buffers of ``module``, outside ``state_dict`` (they come from the spec), so
    that ``module.to(device)`` moves them and ``module.double()`` converts them. Checked here, once (finite,
    ``low < high``): the distributions built from them at every call do not read them on the host."""
    low_t = torch.as_tensor(low, dtype=torch.get_default_dtype()).clone()
    high_t = torch.as_tensor(high, dtype=torch.get_default_dtype()).clone()
    if not bool((low_t < high_t).all() & torch.isfinite(low_t).all() & torch.isfinite(high_t).all()):
        raise ConfigError(f"{type(module).__name__}: needs finite bounds with low < high, got low={low}, "
                          f"high={high}; for actions without bounds use an unbounded spec (and IndependentNormal)")
    module.register_buffer("low", low_t, persistent=False)
    module.register_buffer("high", high_t, persistent=False)


class _BoundedDistributionModule(ProbabilisticTensorDictModule):
    """A probabilistic module whose ``TanhNormal`` gets its bounds precomputed (:class:`TanhBounds`) from buffers,
    which follow ``.to()`` and ``.double()``: a distribution built at every call converts nothing."""

    low: torch.Tensor
    high: torch.Tensor
    mid: torch.Tensor
    half_range: torch.Tensor  # not "half": nn.Module.half() is a method
    log_half_range: torch.Tensor

    def __init__(self, *, low: Any, high: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        register_bounds(self, low, high)
        bounds = TanhBounds.of(self.low, self.high)
        self.register_buffer("mid", bounds.mid, persistent=False)
        self.register_buffer("half_range", bounds.half, persistent=False)
        self.register_buffer("log_half_range", bounds.log_half, persistent=False)

    @property
    def distribution_kwargs(self) -> dict[str, Any]:
        bounds = TanhBounds(self.low, self.high, self.mid, self.half_range, self.log_half_range)
        return {**self._fixed_kwargs, "bounds": bounds}

    @distribution_kwargs.setter
    def distribution_kwargs(self, value: Mapping[str, Any]) -> None:
        self._fixed_kwargs = dict(value)


class ProbabilisticActor(ProbabilisticTensorDictSequential):
    """``module`` writes the distribution's parameters, then an action is drawn from ``distribution_class``.

    ``module`` is a keyed module (``TensorDictModule``) that writes ``in_keys`` (``loc`` and ``scale`` for the
    default :class:`~streamrl.modules.distributions.TanhNormal`; a dict maps the distribution's argument names
    to keys). The actor writes the action at ``out_keys`` and, with ``return_log_prob``, its log-probability at
    ``"sample_log_prob"`` (tensordict 0.15 would name it ``"action_log_prob"``; the key is pinned here, so
    losses and the env stage's ``record=("action", "sample_log_prob")`` can rely on it). ``get_dist(td)`` runs
    ``module`` and returns the distribution, e.g. to score stored actions in a loss.

    What a call writes follows the interaction type (``set_interaction_type``; ``default_interaction_type``
    outside any block): ``RANDOM`` samples (``rsample``), ``DETERMINISTIC`` and ``MODE`` give the squashed
    ``tanh(loc)``, ``MEAN`` the distribution's mean (see ``TanhNormal``).

    For a ``TanhNormal`` (or subclass) the bounds come from ``spec`` when it is a :class:`Bounded` spec, else
    from ``distribution_kwargs`` ``low``/``high`` (default ``[-1, 1]``). They are buffers of the actor, so
    ``actor.to(device)`` moves them; they are not in ``state_dict()``. ``spec`` is kept as ``actor.spec``.
    """

    def __init__(
        self,
        module: TensorDictModuleBase,
        *,
        spec: Spec | None = None,
        in_keys: Sequence[str] | Mapping[str, str] = ("loc", "scale"),
        out_keys: Sequence[str] = ("action",),
        distribution_class: type[torch.distributions.Distribution] = TanhNormal,
        distribution_kwargs: Mapping[str, Any] | None = None,
        return_log_prob: bool = True,
        default_interaction_type: InteractionType = InteractionType.RANDOM,
    ) -> None:
        if not isinstance(module, TensorDictModuleBase):
            raise TypeError(f"ProbabilisticActor: module must be a keyed module that writes {list(in_keys)}, got "
                            f"{type(module).__name__}; wrap it: TensorDictModule(net, in_keys=['observation'], "
                            f"out_keys={list(in_keys)})")
        param_keys = list(in_keys.values()) if isinstance(in_keys, Mapping) else list(in_keys)
        missing = [key for key in param_keys if key not in module.out_keys]
        if missing:
            raise ConfigError(f"ProbabilisticActor: the distribution reads {missing}, which module does not write "
                              f"(its out_keys are {module.out_keys}); make in_keys name the module's outputs")
        kwargs = dict(distribution_kwargs or {})
        if isinstance(distribution_class, type) and issubclass(distribution_class, torch.distributions.Distribution):
            kwargs.setdefault("validate_args", False)  # checks read tensors on the host: no CUDA graph, slower
        common: dict[str, Any] = {
            "in_keys": dict(in_keys) if isinstance(in_keys, Mapping) else param_keys,
            "out_keys": [_single_key(out_keys, "ProbabilisticActor")],
            "default_interaction_type": default_interaction_type,
            "distribution_class": distribution_class,
            "return_log_prob": return_log_prob,
            "log_prob_key": "sample_log_prob",
        }
        dist_module: ProbabilisticTensorDictModule
        if isinstance(distribution_class, type) and issubclass(distribution_class, TanhNormal):
            if isinstance(spec, Bounded):
                low, high = spec.low, spec.high
                given = {key: kwargs.pop(key) for key in ("low", "high") if key in kwargs}  # tutorial 002 passes both
                for key, value in given.items():
                    bound = low if key == "low" else high
                    if not torch.equal(torch.as_tensor(value, dtype=bound.dtype).expand(bound.shape), bound):
                        raise ConfigError(f"ProbabilisticActor: distribution_kwargs {key}={value!r} differs from the "
                                          f"Bounded spec's {key}={bound.tolist()}; pass the spec alone (its bounds are "
                                          "used) or make them agree")
            elif spec is not None:
                raise TypeError(f"ProbabilisticActor: TanhNormal squashes actions into bounds, so spec must be a "
                                f"Bounded spec, got {spec!r}; for unbounded actions use IndependentNormal")
            else:
                low, high = kwargs.pop("low", -1.0), kwargs.pop("high", 1.0)
            dist_module = _BoundedDistributionModule(low=low, high=high, distribution_kwargs=kwargs, **common)
        else:
            dist_module = ProbabilisticTensorDictModule(distribution_kwargs=kwargs, **common)
        super().__init__(module, dist_module)
        self.spec = spec


class Actor(TensorDictModuleBase):
    """A deterministic actor (DDPG, TD3): ``action = module(*in_keys)``, squashed into a Bounded spec's bounds.

    With a :class:`Bounded` ``spec`` the module's output is the pre-squash value: the actor writes
    ``low + (high - low) * (tanh(output) + 1) / 2``, so actions are within the bounds and the module needs no
    final ``tanh``. Without a spec (or with an unbounded one) the output is written as it is: the module is
    responsible for its range. The bounds are buffers (``.to(device)`` moves them; not in ``state_dict()``).
    Exploration noise goes in a module after it (``AdditiveGaussianModule``, ``OrnsteinUhlenbeckModule``).
    """

    low: torch.Tensor | None
    high: torch.Tensor | None

    def __init__(
        self,
        module: nn.Module,
        *,
        spec: Spec | None = None,
        in_keys: Sequence[str] = ("observation",),
        out_keys: Sequence[str] = ("action",),
    ) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        if isinstance(spec, Bounded):
            register_bounds(self, spec.low, spec.high)
        else:
            self.low = self.high = None
        self.in_keys = list(in_keys)  # type: ignore[assignment]
        self.out_keys = [_single_key(out_keys, "Actor")]  # type: ignore[assignment]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = self.module(*(tensordict.get(key) for key in self.in_keys))
        if self.low is not None and self.high is not None:
            action = self.low + (self.high - self.low) * (torch.tanh(action) + 1) / 2
        return tensordict.set(self.out_keys[0], action)


class ValueOperator(TensorDictModuleBase):
    """A critic: ``module`` applied to its ``in_keys`` concatenated along the last dim.

    The output key defaults to ``"state_action_value"`` when ``in_keys`` hold ``"action"`` (a Q-function, e.g.
    ``in_keys=("observation", "action")``) and ``"state_value"`` otherwise (a V-function for PPO/A2C).
    """

    def __init__(
        self,
        module: nn.Module,
        in_keys: Sequence[str] = ("observation",),
        out_keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(in_keys, str) or not in_keys:
            raise ConfigError(f"ValueOperator: in_keys must be a non-empty sequence of keys, got {in_keys=}")
        if out_keys is None:
            out_keys = ("state_action_value",) if "action" in in_keys else ("state_value",)
        self.module = module
        self.in_keys = list(in_keys)  # type: ignore[assignment]
        self.out_keys = [_single_key(out_keys, "ValueOperator")]  # type: ignore[assignment]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        inputs = [tensordict.get(key) for key in self.in_keys]
        value = self.module(inputs[0] if len(inputs) == 1 else torch.cat(inputs, -1))
        return tensordict.set(self.out_keys[0], value)
