"""Specs: the shape, dtype, device and bounds of every entry an env reads or writes.

A spec describes *one* env's entry (no batch dimension); ``rand(batch)`` and ``zero(batch)`` add batch dims::

    spec = Bounded(low=-1.0, high=1.0, shape=(3,))
    a = spec.rand((8,))             # a [8, 3] float32 tensor within the bounds
    assert spec.is_in(a)
    spec.project(a * 10)            # clamped into the bounds

``spec_from_space`` derives specs from gymnasium spaces (Box, Discrete, MultiDiscrete, MultiBinary, Dict).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsIndex, overload

import numpy as np
import torch
from tensordict import TensorDict

from streamrl.errors import ConfigError

Batch = Sequence[int]


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.zeros((), dtype=np.dtype(dtype))).dtype


@dataclass
class Spec(ABC):
    """Base class: an entry of ``shape`` and ``dtype`` on ``device``."""

    shape: Sequence[int]
    dtype: Any  # a torch dtype, or anything numpy understands as one ("float32", np.float32)
    device: Any = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        self.dtype = _torch_dtype(self.dtype)
        self.device = torch.device(self.device)

    def zero(self, batch: Batch = ()) -> torch.Tensor:
        return torch.zeros((*batch, *self.shape), dtype=self.dtype, device=self.device)

    @abstractmethod
    def rand(self, batch: Batch = ()) -> torch.Tensor:
        """A random value of the spec, with leading ``batch`` dims."""

    def is_in(self, value: torch.Tensor) -> bool:
        """True when ``value`` (with any leading batch dims) has this spec's trailing shape and dtype."""
        n = len(self.shape)
        return value.dtype == self.dtype and tuple(value.shape[value.ndim - n:]) == tuple(self.shape)

    def project(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.dtype)


@dataclass
class Unbounded(Spec):
    """Any value of the dtype."""

    def rand(self, batch: Batch = ()) -> torch.Tensor:
        shape = (*batch, *self.shape)
        if self.dtype.is_floating_point:
            return torch.randn(shape, device=self.device).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, device=self.device).bool()
        return torch.randint(-100, 100, shape, device=self.device).to(self.dtype)


@dataclass(init=False)
class Bounded(Spec):
    """Values in ``[low, high]`` (elementwise; scalars broadcast).

    The arguments are TorchRL's, in its order: ``Bounded(low, high, shape=None, device=None, dtype=None)``.
    ``shape`` defaults to the broadcast shape of ``low`` and ``high``, ``dtype`` to float32 and ``device`` to the
    CPU::

        Bounded(-2.0, 2.0, (1,))                    # float32 actions in [-2, 2]
        Bounded(low=0, high=255, shape=(84, 84, 3), dtype=torch.uint8)
    """

    low: Any = 0.0  # a tensor, array or scalar, broadcast to the shape
    high: Any = 1.0

    def __init__(self, low: Any = 0.0, high: Any = 1.0, shape: Sequence[int] | None = None, device: Any = None,
                 dtype: Any = None) -> None:
        if isinstance(high, (torch.dtype, np.dtype)) or (isinstance(high, type) and issubclass(high, np.generic)):
            raise TypeError(f"Bounded takes TorchRL's positional order (low, high, shape, device, dtype); got the "
                            f"dtype {high!r} as high: to give shape and dtype first, pass keywords: "
                            f"Bounded(shape={low!r}, dtype={high!r}, low=..., high=...)")
        if shape is None:
            shape = torch.broadcast_shapes(torch.as_tensor(low).shape, torch.as_tensor(high).shape)
        self.low, self.high = low, high
        super().__init__(shape=shape, dtype=torch.float32 if dtype is None else dtype,
                         device=torch.device("cpu") if device is None else device)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.low = torch.as_tensor(self.low, dtype=self.dtype, device=self.device).expand(self.shape).clone()
        self.high = torch.as_tensor(self.high, dtype=self.dtype, device=self.device).expand(self.shape).clone()
        if (self.low > self.high).any():
            raise ConfigError(f"Bounded spec needs low <= high, got low={self.low}, high={self.high}")

    def rand(self, batch: Batch = ()) -> torch.Tensor:
        shape = (*batch, *self.shape)
        if self.dtype.is_floating_point:
            low, high = self.low.double(), self.high.double()
            finite = torch.isfinite(low) & torch.isfinite(high)
            u = torch.rand(shape, dtype=torch.float64, device=self.device)
            value = torch.where(finite, low + u * (high - low), torch.randn(shape, dtype=torch.float64))
            return value.to(self.dtype)
        u = torch.rand(shape, device=self.device)
        span = (self.high - self.low + 1).to(torch.float64)
        return (self.low + torch.floor(u * span).to(self.dtype)).to(self.dtype)

    @property
    def space(self) -> ContinuousBox:
        """TorchRL's ``spec.space``: ``space.low``/``space.high`` are the bounds (also ``minimum``/``maximum``)."""
        return ContinuousBox(self.low, self.high)

    def is_in(self, value: torch.Tensor) -> bool:
        return super().is_in(value) and bool(((value >= self.low) & (value <= self.high)).all())

    def project(self, value: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(value.to(self.dtype), self.high), self.low)

    def __repr__(self) -> str:
        return (f"Bounded(shape={tuple(self.shape)}, dtype={self.dtype}, low={_compact(self.low)}, "
                f"high={_compact(self.high)})")


def _compact(bound: torch.Tensor) -> str:
    """A bound as a scalar when it is the same everywhere, else its values (truncated)."""
    flat = bound.flatten()
    if flat.numel() and bool((flat == flat[0]).all()):
        return str(flat[0].item())
    values = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in flat[:6].tolist())
    return f"[{values}{', ...' if flat.numel() > 6 else ''}]"


@dataclass(frozen=True)
class DiscreteBox:
    """The values of a discrete spec (TorchRL's ``spec.space``): ``n`` choices, ``0 .. n - 1``."""

    n: int


@dataclass(frozen=True)
class ContinuousBox:
    """The values of a :class:`Bounded` spec (TorchRL's ``spec.space``): ``low`` to ``high`` (elementwise).

    ``minimum``/``maximum`` are the older TorchRL names of the same bounds.
    """

    low: torch.Tensor
    high: torch.Tensor

    @property
    def minimum(self) -> torch.Tensor:
        return self.low

    @property
    def maximum(self) -> torch.Tensor:
        return self.high


class IndexShape(tuple[int, ...]):
    """The shape ``()`` of a :class:`Categorical` spec with one index per step: an empty tuple (equal to
    ``torch.Size([])``) whose indexing fails saying to read ``spec.n``.

    TorchRL users write ``env.action_spec.shape[-1]`` for the number of actions, which holds for TorchRL's one-hot
    specs (shape ``[..., n]``); an index spec has no action dim, so that is an ``IndexError`` either way, here
    with the fix in its message.
    """

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...

    def __getitem__(self, index: SupportsIndex | slice) -> int | tuple[int, ...]:
        if not isinstance(index, slice):
            raise IndexError(f"a Categorical spec's shape is () (one action index per step, no action dim), so "
                             f"shape[{index}] does not exist; the number of actions is spec.n (or spec.space.n). "
                             f"TorchRL's shape[-1] is n for a one-hot spec (OneHot, shape [..., n])")
        return super().__getitem__(index)


@dataclass
class _Discrete(Spec):
    """What the discrete specs share: ``n`` choices, and TorchRL's ``spec.space``."""

    n: int = 2

    @property
    def space(self) -> DiscreteBox:
        """TorchRL's ``spec.space``: ``space.n`` is the number of choices."""
        return DiscreteBox(self.n)


@dataclass
class Categorical(_Discrete):
    """An index in ``[0, n)`` (``shape`` () for one choice, ``(k,)`` for k independent choices).

    ``n`` (and ``space.n``) is the number of choices. With shape ``()`` there is no action dim: ``shape[-1]``
    raises an ``IndexError`` that says to read ``n`` (TorchRL's one-hot specs have shape ``[..., n]``).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.shape) == 0:
            self.shape = IndexShape()

    def rand(self, batch: Batch = ()) -> torch.Tensor:
        return torch.randint(0, self.n, (*batch, *self.shape), device=self.device).to(self.dtype)

    def is_in(self, value: torch.Tensor) -> bool:
        return super().is_in(value) and bool(((value >= 0) & (value < self.n)).all())

    def project(self, value: torch.Tensor) -> torch.Tensor:
        return value.clamp(0, self.n - 1).to(self.dtype)


@dataclass
class OneHot(_Discrete):
    """A one-hot vector over ``n`` choices (last dim of ``shape`` is ``n``)."""

    def rand(self, batch: Batch = ()) -> torch.Tensor:
        index = torch.randint(0, self.n, (*batch, *self.shape[:-1]), device=self.device)
        return torch.nn.functional.one_hot(index, self.n).to(self.dtype)

    def is_in(self, value: torch.Tensor) -> bool:
        return super().is_in(value) and bool((value.long().sum(-1) == 1).all()) and bool(
            ((value == 0) | (value == 1)).all()
        )

    def project(self, value: torch.Tensor) -> torch.Tensor:
        """The one-hot of the largest entry."""
        return torch.nn.functional.one_hot(value.argmax(-1), self.n).to(self.dtype)

    def to_index(self, value: torch.Tensor) -> torch.Tensor:
        return value.long().argmax(-1)


class Composite:
    """Named specs (nested allowed); ``rand``/``zero`` give a TensorDict."""

    def __init__(self, specs: dict[str, Spec | Composite] | None = None, **kwargs: Spec | Composite) -> None:
        self.specs: dict[str, Spec | Composite] = {**(specs or {}), **kwargs}

    def __getitem__(self, key: str | tuple[str, ...]) -> Spec | Composite:
        if isinstance(key, tuple):
            node: Spec | Composite = self
            for k in key:
                assert isinstance(node, Composite), f"{key} goes through a leaf spec"
                node = node.specs[k]
            return node
        return self.specs[key]

    def __setitem__(self, key: str, spec: Spec | Composite) -> None:
        self.specs[key] = spec

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def keys(self) -> Iterator[str]:
        return iter(self.specs)

    def items(self) -> Iterator[tuple[str, Spec | Composite]]:
        return iter(self.specs.items())

    def rand(self, batch: Batch = ()) -> TensorDict:
        return TensorDict({k: s.rand(batch) for k, s in self.specs.items()}, batch_size=list(batch))

    def zero(self, batch: Batch = ()) -> TensorDict:
        return TensorDict({k: s.zero(batch) for k, s in self.specs.items()}, batch_size=list(batch))

    def is_in(self, td: TensorDict) -> bool:
        return all(k in td.keys() and s.is_in(td.get(k)) for k, s in self.specs.items())

    def __repr__(self) -> str:
        return f"Composite({', '.join(f'{k}={v!r}' for k, v in self.specs.items())})"


def spec_from_space(space: Any) -> Spec | Composite:
    """The spec of one env's entry described by a gymnasium space."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        low, high = torch.from_numpy(np.asarray(space.low)), torch.from_numpy(np.asarray(space.high))
        if np.all(np.isinf(space.low)) and np.all(np.isinf(space.high)):
            return Unbounded(shape=space.shape, dtype=space.dtype)
        return Bounded(shape=space.shape, dtype=space.dtype, low=low, high=high)
    if isinstance(space, spaces.Discrete):
        if int(space.start) != 0:
            raise ValueError(f"Discrete spaces must start at 0, got start={space.start}")
        return Categorical(shape=(), dtype=torch.int64, n=int(space.n))
    if isinstance(space, spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec)
        if len(set(nvec.ravel().tolist())) == 1:
            return Categorical(shape=space.shape, dtype=torch.int64, n=int(nvec.ravel()[0]))
        return Bounded(shape=space.shape, dtype=torch.int64, low=torch.zeros(space.shape, dtype=torch.int64),
                       high=torch.from_numpy(nvec.astype(np.int64) - 1))
    if isinstance(space, spaces.MultiBinary):
        return Bounded(shape=space.shape, dtype=torch.int8, low=0, high=1)
    if isinstance(space, spaces.Dict):
        return Composite({k: spec_from_space(s) for k, s in space.spaces.items()})
    raise TypeError(
        f"no spec for gymnasium space {space!r}; supported: Box, Discrete, MultiDiscrete, MultiBinary, Dict"
    )
