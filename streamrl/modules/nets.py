"""Networks: plain ``torch.nn`` modules that keyed modules wrap.

::

    q_net = MLP(out_features=2, num_cells=(64, 64))          # input size inferred on the first call
    q_net = MLP(in_features=4, out_features=2, activation=torch.nn.Tanh)
    q_net = MLP(2, num_cells=64, depth=3)                     # three hidden layers of 64
    cnn = ConvNet(num_cells=(32, 64), kernel_sizes=(8, 4), strides=(2, 1))
    cnn(torch.randn(10, 3, 32, 32)).shape                     # [10, 6400]: channels x height x width, flattened
    q_net = DuelingCnnDQNet(6, cnn_kwargs={"kernel_sizes": (6, 4, 3), "strides": (2, 2, 1)},
                            mlp_kwargs={"num_cells": (64, 64)})
    q_net = nn.Sequential(FrameNorm(), DuelingCnnDQNet(6))    # uint8 frames in, scaled to [0, 1] inside

Input sizes left as ``None`` (the default) are inferred on the first call (``LazyLinear``, ``LazyConv2d``): run
one batch through a lazy network before handing its parameters to an optimizer or publishing its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from streamrl.errors import ConfigError, torchrl_names


def _cells(num_cells: int | Sequence[int], depth: int | None, what: str) -> list[int]:
    if isinstance(num_cells, int):
        if depth is None:
            raise ConfigError(f"{what}: num_cells={num_cells} is an int, so depth is needed (the number of layers); "
                              f"pass depth=..., or num_cells as a sequence of widths")
        return [num_cells] * depth
    cells = list(num_cells)
    if depth is not None and depth != len(cells):
        raise ConfigError(f"{what}: depth={depth} but num_cells={cells} has {len(cells)} widths; "
                          f"pass one of them, or make them agree")
    return cells


def _per_layer(value: int | Sequence[int], depth: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise ConfigError(f"ConvNet: {name}={values} has {len(values)} entries for {depth} layers (num_cells); "
                          f"pass one per layer, or a single int for all")
    return values


def _aggregator(value: Any) -> str:
    return (f"ConvNet takes none of TorchRL's aggregator_class, aggregator_kwargs and squeeze_output (got one of "
            f"them: {value!r}): it flattens [C', H', W'] at the end (flatten=True); to pool first, write "
            f"nn.Sequential(ConvNet(..., flatten=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(-3))")


class MLP(nn.Sequential):
    """A multi-layer perceptron: hidden layers of ``activation`` (optionally normed), then a linear output.

    ``num_cells`` lists the hidden widths; an int with ``depth`` means ``depth`` layers of that width (``depth=0``:
    a single linear layer). ``in_features=None`` makes the first layer lazy: its size is taken from the first
    input. Each hidden layer is ``Linear -> norm_class(width) -> activation(**activation_kwargs)``;
    ``activate_last`` adds an activation after the output layer. TorchRL's names ``activation_class`` and
    ``activate_last_layer`` are accepted for ``activation`` and ``activate_last``. Several inputs are joined on the
    last dim: ``MLP(1, in_features=obs + act)(observation, action)``.
    """

    @torchrl_names("MLP", accept={"activation_class": "activation", "activate_last_layer": "activate_last"})
    def __init__(
        self,
        out_features: int,
        *,
        in_features: int | None = None,
        num_cells: int | Sequence[int] = (64, 64),
        depth: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
        activation_kwargs: dict[str, Any] | None = None,
        norm_class: type[nn.Module] | None = None,
        activate_last: bool = False,
    ) -> None:
        act_kwargs = activation_kwargs or {}
        layers: list[nn.Module] = []
        prev = in_features
        for width in _cells(num_cells, depth, "MLP"):
            layers.append(nn.Linear(prev, width) if prev is not None else nn.LazyLinear(width))
            if norm_class is not None:
                layers.append(norm_class(width))
            layers.append(activation(**act_kwargs))
            prev = width
        layers.append(nn.Linear(prev, out_features) if prev is not None else nn.LazyLinear(out_features))
        if activate_last:
            layers.append(activation(**act_kwargs))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One input, or several joined on the last dim (as TorchRL's MLP does: ``in_keys=["observation",
        "action"]`` for a Q-value critic)."""
        return super().forward(inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1))


class ConvNet(nn.Sequential):
    """A stack of ``Conv2d -> activation`` layers over images ``[*batch, C, H, W]``, flattened at the end.

    ``num_cells`` lists the output channels (an int with ``depth``: that many layers of that width);
    ``kernel_sizes``, ``strides`` and ``paddings`` give one value per layer, or an int for all. Each layer maps a
    side of ``s`` pixels to ``(s + 2 * padding - kernel) // stride + 1``. Any number of leading batch dims is
    accepted (``[N, T, C, H, W]`` too): they are folded into one for the convolutions and restored after. With
    ``flatten=True`` the output is ``[*batch, C' * H' * W']``, otherwise ``[*batch, C', H', W']``.
    ``in_features`` (input channels) ``None`` makes the first layer a ``LazyConv2d``. TorchRL's
    ``activation_class`` is accepted for ``activation``; its ``aggregator_class`` and ``squeeze_output`` are refused
    with what to write instead.
    """

    @torchrl_names("ConvNet", accept={"activation_class": "activation"},
                   convert=dict.fromkeys(("aggregator_class", "aggregator_kwargs", "squeeze_output"), _aggregator))
    def __init__(
        self,
        *,
        num_cells: int | Sequence[int] = (32, 64, 64),
        kernel_sizes: int | Sequence[int] = (8, 4, 3),
        strides: int | Sequence[int] = (4, 2, 1),
        paddings: int | Sequence[int] = 0,
        depth: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
        in_features: int | None = None,
        flatten: bool = True,
    ) -> None:
        cells = _cells(num_cells, depth, "ConvNet")
        if not cells:
            raise ConfigError("ConvNet: needs at least one layer, got num_cells=[]")
        kernels = _per_layer(kernel_sizes, len(cells), "kernel_sizes")
        strides_ = _per_layer(strides, len(cells), "strides")
        pads = _per_layer(paddings, len(cells), "paddings")
        layers: list[nn.Module] = []
        prev = in_features
        for width, k, s, p in zip(cells, kernels, strides_, pads, strict=True):
            if prev is None:
                layers.append(nn.LazyConv2d(width, kernel_size=k, stride=s, padding=p))
            else:
                layers.append(nn.Conv2d(prev, width, kernel_size=k, stride=s, padding=p))
            layers.append(activation())
            prev = width
        super().__init__(*layers)
        self.in_features = in_features
        self.flatten = flatten

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.ndim < 3:
            raise ValueError(f"ConvNet: expected images [*batch, C, H, W], got shape {tuple(input.shape)}")
        batch = input.shape[:-3]
        out = super().forward(input.reshape(-1, *input.shape[-3:]))
        return out.reshape(*batch, -1) if self.flatten else out.reshape(*batch, *out.shape[-3:])


class DuelingCnnDQNet(nn.Module):
    """A dueling Q-network over images: ``Q = V + A - mean_a(A)`` from heads on a shared :class:`ConvNet`.

    ``features`` is ``ConvNet(**cnn_kwargs)``; ``advantage`` (``out_features`` outputs) and ``value`` (one
    output, or ``out_features_value``) are ``MLP(**mlp_kwargs)`` heads on its flattened output. The defaults are
    the Nature-DQN sizes (convolutions of 32, 64, 64 channels, kernels 8, 4, 3, strides 4, 2, 1; one hidden layer
    of 512); all input sizes are lazy. The arguments are TorchRL's, in its order: ``DuelingCnnDQNet(n_actions, 1,
    cnn_kwargs, mlp_kwargs)`` works as there (the kwargs with TorchRL's names where :class:`MLP` and
    :class:`ConvNet` accept them).
    """

    def __init__(
        self,
        out_features: int,
        out_features_value: int = 1,
        cnn_kwargs: dict[str, Any] | None = None,
        mlp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if out_features_value not in (1, out_features):
            raise ConfigError(f"DuelingCnnDQNet: out_features_value must be 1 (one state value, the usual) or "
                              f"out_features={out_features} (one per action), got {out_features_value=}")
        for name, kwargs in (("cnn_kwargs", cnn_kwargs), ("mlp_kwargs", mlp_kwargs)):
            if kwargs is not None and not isinstance(kwargs, dict):
                raise TypeError(f"DuelingCnnDQNet: {name} must be a dict of keyword arguments, got "
                                f"{type(kwargs).__name__}; the order is (out_features, out_features_value, "
                                f"cnn_kwargs, mlp_kwargs)")
        mlp = {"num_cells": (512,), **(mlp_kwargs or {})}
        self.features = ConvNet(**(cnn_kwargs or {}))
        self.advantage = MLP(out_features, **mlp)
        self.value = MLP(out_features_value, **mlp)
        self.out_features = out_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.features(input)
        advantage = self.advantage(x)
        return self.value(x) + advantage - advantage.mean(-1, keepdim=True)


class FrameNorm(nn.Module):
    """``(x - loc) / scale`` in float32: the first layer of a network that reads frames kept as uint8.

    Frames stored raw take a quarter of the memory of float32 ones in replay and between processes; the
    conversion happens here, on the learner's and the policy's device. The default divides by 255 (0..255 becomes
    0..1); ``loc``/``scale`` measured on the frames (their mean and std) standardize them instead. Both are
    buffers: they travel with the weights and the checkpoints.
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, loc: float | torch.Tensor = 0.0, scale: float | torch.Tensor = 255.0) -> None:
        super().__init__()
        scale_t = torch.as_tensor(scale, dtype=torch.float32)
        if not bool((scale_t > 0).all()):
            raise ConfigError(f"FrameNorm: scale must be > 0, got {scale!r}")
        self.register_buffer("loc", torch.as_tensor(loc, dtype=torch.float32).clone())
        self.register_buffer("scale", scale_t.clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return (input.to(torch.float32) - self.loc) / self.scale
