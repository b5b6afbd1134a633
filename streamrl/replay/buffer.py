"""The replay buffer: a storage, a sampler and a rate limiter composed.

::

    rb = ReplayBuffer(RamStorage(100_000), batch_size=256)
    rb.extend(chunk)                  # a chunk [num_envs, time] is flattened into rows
    batch = rb.sample()               # TensorDict [256] with an "index" entry (ring positions)

In a pipeline, a writer stage and a sampler stage share one buffer; its limiter paces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.replay.ratelimit import RateLimiter
from streamrl.replay.samplers import Sampler, UniformSampler
from streamrl.replay.storage import RamStorage, ZarrStorage


class ReplayBuffer:
    """Storage + sampler + rate limiter; see the module docstring."""

    def __init__(
        self,
        storage: RamStorage | ZarrStorage,
        *,
        sampler: Sampler | None = None,
        batch_size: int = 256,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.storage = storage
        self.sampler = sampler or UniformSampler()
        self.batch_size = batch_size
        self.limiter = limiter or RateLimiter(batch_size=batch_size)

    def attach(self, run_dir: Path) -> None:
        if isinstance(self.storage, ZarrStorage):
            self.storage.attach(run_dir)

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        """Store a chunk ``[num_envs, time]`` (or rows ``[n]``); rows marked not ``valid`` are dropped."""
        rows = data.reshape(-1) if data.batch_dims != 1 else data
        valid = rows.get("valid", None)
        if valid is not None:
            rows = rows.exclude("valid")[valid]
        return self.storage.extend(rows)

    def sample(self, batch_size: int | None = None) -> TensorDict:
        index, info = self.sampler.sample(self.storage, batch_size or self.batch_size)
        batch = self.storage.get(index)
        batch.set("index", index)
        for key, value in info.items():
            batch.set(key, value)
        return batch

    def __len__(self) -> int:
        return len(self.storage)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"limiter": self.limiter.state_dict(), "storage": self.storage.state_dict()}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state
