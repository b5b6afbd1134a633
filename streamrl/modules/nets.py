"""Networks: plain ``torch.nn`` modules that keyed modules wrap.

::

    q_net = MLP(out_features=2, num_cells=(64, 64))          # input size inferred on the first call
    q_net = MLP(in_features=4, out_features=2, activation=torch.nn.Tanh)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """A multi-layer perceptron: ``len(num_cells)`` hidden layers of ``activation``, then a linear output.

    ``in_features=None`` makes the first layer lazy: its size is taken from the first input.
    """

    def __init__(
        self,
        out_features: int,
        *,
        in_features: int | None = None,
        num_cells: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU,
        activate_last: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        sizes = list(num_cells)
        prev = in_features
        for width in sizes:
            layers.append(nn.Linear(prev, width) if prev is not None else nn.LazyLinear(width))
            layers.append(activation())
            prev = width
        layers.append(nn.Linear(prev, out_features) if prev is not None else nn.LazyLinear(out_features))
        if activate_last:
            layers.append(activation())
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
