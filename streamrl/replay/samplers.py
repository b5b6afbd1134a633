"""Samplers: which rows to read. The contract is ``sample(storage, batch_size) -> (indices, info)``.

::

    indices, info = UniformSampler().sample(storage, 256)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from streamrl.errors import StoreError


class Sampler(Protocol):
    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]: ...


class UniformSampler:
    """Rows drawn uniformly with replacement among the rows the storage holds."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        size = len(storage)
        if size == 0:
            raise StoreError("cannot sample from an empty storage; wait for the first rows (min_fill)")
        return torch.randint(size, (batch_size,), generator=self.generator), {}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
