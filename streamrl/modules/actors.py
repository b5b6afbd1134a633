"""Actors: keyed modules (``tensordict.nn``) that read observations and write actions.

::

    actor = QValueActor(MLP(out_features=2))        # reads "observation"
    td = actor(TensorDict({"observation": obs}, [8]))
    td["action"], td["action_value"], td["chosen_action_value"]

    actor = QValueActor(net, in_key="pixels", spec=env.action_spec)   # one-hot actions for a OneHot spec
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from streamrl.envs.specs import Categorical, OneHot


class QValueActor(TensorDictModuleBase):
    """Greedy actor over a Q-value network: ``action = argmax_a Q(observation, a)``.

    Writes ``action_value`` (all Q-values, ``[..., n]``), ``chosen_action_value`` (``[..., 1]``, the Q-value of
    the action taken) and ``action``: an index when ``spec`` is a :class:`Categorical` (or no spec is given), a
    one-hot vector when it is a :class:`OneHot`, in the spec's dtype. ``one_hot=True``/``False`` overrides the
    form the spec implies. Ties go to the lowest index.
    """

    def __init__(
        self,
        value_net: nn.Module,
        *,
        in_key: str = "observation",
        spec: Categorical | OneHot | None = None,
        one_hot: bool | None = None,
    ) -> None:
        super().__init__()
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
