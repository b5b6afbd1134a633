"""The replay buffer: a storage, a sampler and a rate limiter composed.

::

    rb = ReplayBuffer(RamStorage(100_000), batch_size=256)
    rb.extend(chunk)                  # a chunk [num_envs, time] is flattened into rows (transitions)
    batch = rb.sample()               # TensorDict [256] with an "index" entry (ring positions)

    rb = ReplayBuffer(RamStorage(1_000), batch_size=8, trajectories=True)
    rb.extend(chunk)                  # one row per env: its `time` steps, stored as a [capacity, time] ring
    batch = rb.sample()               # TensorDict [8, time]: whole sub-trajectories (for TD(lambda), GAE, ...)

In a pipeline, a writer stage and a sampler stage share one buffer; its limiter paces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.replay.ratelimit import RateLimiter
from streamrl.replay.samplers import Sampler, UniformSampler
from streamrl.replay.storage import RamStorage
from streamrl.replay.zarr_store import ZarrStorage


def transitions(data: TensorDictBase) -> TensorDictBase:
    """A chunk ``[num_envs, time]`` (or rows ``[n]``) as rows ``[n]``, without the rows marked not ``valid`` (the
    reset steps of envs that auto-reset on the next step: not transitions)."""
    rows = data.reshape(-1) if data.batch_dims != 1 else data
    valid = rows.get("valid", None)
    return rows if valid is None else rows.exclude("valid")[valid]


class ReplayBuffer:
    """Storage + sampler + rate limiter; see the module docstring."""

    def __init__(
        self,
        storage: RamStorage | ZarrStorage,
        *,
        sampler: Sampler | None = None,
        batch_size: int = 256,
        limiter: RateLimiter | None = None,
        trajectories: bool = False,
    ) -> None:
        self.trajectories = trajectories
        self.storage = storage
        self.sampler = sampler or UniformSampler()
        self.batch_size = batch_size
        self.limiter = limiter or RateLimiter(batch_size=batch_size)

    def attach(self, run_dir: Path) -> None:
        if isinstance(self.storage, ZarrStorage):
            self.storage.attach(run_dir)

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        """Store a chunk ``[num_envs, time]`` (or rows ``[n]``); rows marked not ``valid`` are dropped.

        With ``trajectories``, each env's row of the chunk is stored whole (``valid`` kept as an entry).
        """
        if self.trajectories:
            if data.batch_dims != 2:
                raise ValueError(f"trajectory rows come from chunks [num_envs, time], got batch_size="
                                 f"{tuple(data.batch_size)}")
            rows = data.clone(recurse=False)
            rows.batch_size = data.batch_size[:1]  # time becomes part of each row
            return self.storage.extend(rows)
        return self.storage.extend(transitions(data))

    def rows_for(self, data: TensorDictBase) -> int:
        """How many rows :meth:`extend` will store from ``data`` (what the rate limiter counts)."""
        if self.trajectories:
            return data.batch_size[0]
        valid = data.get("valid", None)
        return int(valid.sum()) if valid is not None else data.batch_size.numel()

    def sample(self, batch_size: int | None = None) -> TensorDict:
        index, info = self.sampler.sample(self.storage, batch_size or self.batch_size)
        batch = self.storage.get(index)
        if self.trajectories:  # rows [B] of [T] steps -> [B, T]; per-row entries repeat along time
            batch.batch_size = next(iter(batch.values(include_nested=True, leaves_only=True))).shape[:2]
            info = {key: value.reshape(-1, *(1,) * (batch.batch_dims - 1)).expand(batch.batch_size)
                    if value.ndim == 1 else value for key, value in info.items()}
            index = index[:, None].expand(batch.batch_size)
        batch.set("index", index)
        for key, value in info.items():
            batch.set(key, value)
        return batch

    def __len__(self) -> int:
        return len(self.storage)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.limiter.load_state_dict(state["limiter"])
        self.storage.load_state_dict(state["storage"])
        if "sampler" in state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"limiter": self.limiter.state_dict(), "storage": self.storage.state_dict()}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state
