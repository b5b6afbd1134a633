"""Actors: keyed modules (``tensordict.nn``) that read observations and write actions.

::

    actor = QValueActor(MLP(out_features=2))        # reads "observation"
    td = actor(TensorDict({"observation": obs}, [8]))
    td["action"], td["action_value"]
"""

from __future__ import annotations

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn


class QValueActor(TensorDictModuleBase):
    """Greedy actor over a Q-value network: ``action = argmax_a Q(observation, a)``.

    Writes ``action`` (an index, int64; or one-hot when ``one_hot=True``) and ``action_value`` (all Q-values);
    with ``chosen_value=True`` also ``chosen_action_value`` (``[..., 1]``, the Q-value of the action taken).
    """

    def __init__(self, value_net: nn.Module, *, in_key: str = "observation", one_hot: bool = False,
                 chosen_value: bool = False) -> None:
        super().__init__()
        self.value_net = value_net
        self.one_hot = one_hot
        self.chosen_value = chosen_value
        self.in_keys = [in_key]  # type: ignore[assignment]
        self.out_keys = ["action", "action_value"] + (["chosen_action_value"] if chosen_value else [])  # type: ignore[assignment]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        values = self.value_net(tensordict.get(self.in_keys[0]))
        index = values.argmax(-1)
        tensordict.set("action_value", values)
        if self.chosen_value:
            tensordict.set("chosen_action_value", values.gather(-1, index.unsqueeze(-1)))
        if self.one_hot:
            tensordict.set("action", nn.functional.one_hot(index, values.shape[-1]))
        else:
            tensordict.set("action", index)
        return tensordict
