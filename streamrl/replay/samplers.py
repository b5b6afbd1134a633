"""Samplers: which rows to read. The contract is ``sample(storage, batch_size) -> (indices, info)``.

::

    indices, info = UniformSampler().sample(storage, 256)
    rb = ReplayBuffer(storage, sampler=PrioritizedSampler(alpha=0.6, beta=0.4))   # info: "weight"
    rb = ReplayBuffer(storage, sampler=SliceSampler(slice_len=8))                 # info: "slice_id"

``indices`` are ring positions (a LongTensor ``[batch_size]``); :class:`ReplayBuffer` stores them in the batch as
``index`` and every ``info`` entry as a key of the batch. Samplers that keep state about the rows (priorities,
valid slice starts) learn of new rows from ``storage.total_written`` when they sample, so rows written by any
path, a store reopened on resume included, are never missed.

* :class:`UniformSampler` — with replacement, uniform over the rows held.
* :class:`PrioritizedSampler` — proportional prioritized replay (Schaul et al., 2016) over a :class:`SumTree`.
* :class:`SamplerWithoutReplacement` — epochs: every row once per epoch, shuffled or oldest first.
* :class:`SliceSampler` — contiguous sub-trajectories that never cross an episode end or the write cursor.
* :class:`FifoSampler` — queue mode: rows in write order, each once.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from streamrl.errors import ConfigError, StoreError
from streamrl.replay.sumtree import SumTree


class Sampler(Protocol):
    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]: ...


class UniformSampler:
    """Rows drawn uniformly with replacement among the rows the storage holds.

    :meth:`sample_on` draws the same distribution on a device (for a ring mirrored there, see
    :mod:`streamrl.replay.device_ring`) with a generator of that device, seeded once by a draw of ``generator``
    (torch's default when None). That generator is derived state, never saved: a resumed sampler seeds a new one
    from its restored ``generator``.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self._device_generators: dict[torch.device, torch.Generator] = {}

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._draw(storage, batch_size, self.generator, torch.device("cpu")), {}

    def sample_on(self, storage: Any, batch_size: int, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`sample`, drawn on ``device``: no host sync (``len``, ``capacity`` and ``cursor`` are host ints)."""
        generator = self._device_generators.get(device)
        if generator is None:  # seeded once by a CPU draw (.numpy(): no device involved)
            seed = int(torch.randint(2**62, (), generator=self.generator).numpy())
            generator = self._device_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._draw(storage, batch_size, generator, device), {}

    @staticmethod
    def _draw(storage: Any, batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        size = len(storage)
        if size == 0:
            raise StoreError("cannot sample from an empty storage; wait for the first rows (min_fill)")
        index = torch.randint(size, (batch_size,), generator=generator, device=device)
        if size < storage.capacity and (oldest := _oldest_slot(storage)):  # rows need not start at slot 0 (a
            index = (index + oldest) % storage.capacity  # repaired store); a full ring is uniform either way
        return index

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


def _oldest_slot(storage: Any) -> int:
    """The ring slot of the oldest row held (the cursor's slot once the ring is full, else slot 0)."""
    return (storage.cursor - len(storage)) % storage.capacity


def slots_oldest_first(storage: Any) -> torch.Tensor:
    """The ring slots of the rows held, oldest first."""
    return torch.arange(storage.capacity).roll(-_oldest_slot(storage))[: len(storage)]


def _columns_oldest_first(storage: Any, keys: list[Any]) -> list[np.ndarray]:
    """Stored columns, oldest row first: read in place from a RAM ring, else gathered (all keys) by ``get``."""
    data = storage.ram_rows  # None: not every row is in RAM (ZarrStorage(in_ram=False)), or none was written
    if data is not None:
        return [np.roll(data.get(key).numpy(), -_oldest_slot(storage), axis=0)[: len(storage)] for key in keys]
    rows = storage.get(slots_oldest_first(storage))
    return [rows.get(key).numpy() for key in keys]


class PrioritizedSampler:
    """Rows drawn with probability ``P(i) = p_i ** alpha / sum_j p_j ** alpha`` (proportional prioritization).

    ::

        rb = ReplayBuffer(RamStorage(100_000), sampler=PrioritizedSampler(alpha=0.6, beta=0.4))
        batch = rb.sample()                                  # carries "index" and "weight"
        loss = (batch["weight"] * elementwise_loss).mean()   # DQNLoss does this when the batch has "weight"
        rb.sampler.update_priority(batch["index"], td_error) # in a pipeline, the PriorityUpdate hook does it

    ``update_priority`` sets ``p_i = |td_error_i| + eps``. Rows written since the last ``sample`` (found from
    ``storage.total_written``) get the largest priority seen so far, at least ``max_priority``, so each is likely
    sampled soon, even if a late update for the row it replaced came in between. A batch is stratified: the total
    mass is cut into ``batch_size`` equal segments and one row is drawn in each. ``weight`` is the importance
    weight ``(N * P(i)) ** -beta`` divided by its largest value over the buffer (the row of least priority), so
    weights lie in ``(0, 1]``; ``N`` cancels out. Set ``sampler.beta`` to anneal it towards 1 during training.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        max_priority: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ConfigError(f"PrioritizedSampler: alpha and beta must be >= 0, got {alpha=}, {beta=}")
        if eps <= 0 or max_priority <= 0:
            raise ConfigError(f"PrioritizedSampler: eps and max_priority must be > 0, got {eps=}, {max_priority=}")
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.max_priority = max_priority
        self.generator = generator
        self.tree: SumTree | None = None
        self.rows_seen = 0  # storage.total_written when the tree last caught up

    def _catch_up(self, storage: Any) -> SumTree:
        """Give the rows written since the last call the largest priority seen so far."""
        written, capacity = storage.total_written, storage.capacity
        if self.tree is None or self.tree.capacity != capacity or written < self.rows_seen:
            self.tree = SumTree(capacity)  # first use, or a storage that is not the one the tree described
            self.rows_seen = written - len(storage)
        if written > self.rows_seen:
            new = np.arange(max(self.rows_seen, written - capacity), written) % capacity
            self.tree.update(new, self.max_priority ** self.alpha)
            self.rows_seen = written
        return self.tree

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if len(storage) == 0:
            raise StoreError("cannot sample from an empty storage; wait for the first rows (min_fill)")
        tree = self._catch_up(storage)
        u = torch.rand(batch_size, dtype=torch.float64, generator=self.generator).numpy()
        leaves = tree.find((np.arange(batch_size) + u) * (tree.total / batch_size))
        weight = (tree[leaves] / tree.min) ** -self.beta
        return torch.from_numpy(leaves), {"weight": torch.from_numpy(weight).float()}

    def update_priority(self, indices: torch.Tensor, priority: torch.Tensor) -> None:
        """Set ``p_i = |priority_i| + eps`` for the rows at ``indices`` (one value each; any device)."""
        if self.tree is None:
            raise StoreError("PrioritizedSampler.update_priority before the first sample: priorities are set "
                             "for the rows of a sampled batch (batch['index'])")
        index = torch.as_tensor(indices).detach().reshape(-1).cpu().numpy()
        p = torch.as_tensor(priority).detach().reshape(-1).double().abs().cpu().numpy() + self.eps
        if p.shape != index.shape:
            raise ValueError(f"update_priority: {index.shape[0]} indices but {p.shape[0]} priorities; "
                             "pass one priority per sampled row")
        if not np.isfinite(p).all():
            raise ValueError(f"update_priority: priorities must be finite, got {p[~np.isfinite(p)][:4].tolist()}; "
                             "the loss diverged (check the learning rate, reward scale or gradient clipping)")
        self.max_priority = max(self.max_priority, float(p.max(initial=0.0)))
        self.tree.update(index, p ** self.alpha)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"max_priority": self.max_priority, "rows_seen": self.rows_seen,
                                 "tree": None if self.tree is None else self.tree.state_dict()}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_priority, self.rows_seen = state["max_priority"], state["rows_seen"]
        self.tree = None
        if state["tree"] is not None:
            self.tree = SumTree(state["tree"]["capacity"])
            self.tree.load_state_dict(state["tree"])
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


class SamplerWithoutReplacement:
    """Epochs over the rows held: each row exactly once per epoch, in batches.

    ::

        sampler = SamplerWithoutReplacement(shuffle=True, drop_last=False)
        while sampler.epochs < 10:
            index, _ = sampler.sample(storage, 64)

    An epoch is a permutation of the rows held when it starts (oldest first with ``shuffle=False``); rows
    written during an epoch join the next one. The last batch of an epoch is shorter when the rows do not divide
    into batches, or is skipped with ``drop_last=True``. ``epochs`` counts finished epochs.
    """

    def __init__(self, *, shuffle: bool = True, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.epochs = 0
        self.order: torch.Tensor | None = None  # ring positions of the current epoch
        self.pos = 0

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.order is None:
            size = len(storage)
            if size == 0 or (self.drop_last and size < batch_size):
                raise StoreError(f"SamplerWithoutReplacement: the storage holds {size} rows, fewer than a batch "
                                 f"of {batch_size} (drop_last={self.drop_last}); wait for more rows (min_fill)")
            order = slots_oldest_first(storage)
            self.order = order[torch.randperm(size, generator=self.generator)] if self.shuffle else order
            self.pos = 0
        index = self.order[self.pos:self.pos + batch_size]
        self.pos += index.shape[0]
        if self.order.shape[0] - self.pos < (batch_size if self.drop_last else 1):
            self.epochs += 1
            self.order = None
        return index, {}

    def state_dict(self) -> dict[str, Any]:
        state = {"epochs": self.epochs, "order": self.order, "pos": self.pos}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs, self.order, self.pos = state["epochs"], state["order"], state["pos"]
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


class SliceSampler:
    """Contiguous sub-trajectories of ``slice_len`` rows, for recurrent or sequence models.

    ::

        rb = ReplayBuffer(RamStorage(100_000), sampler=SliceSampler(8), batch_size=256)
        batch = rb.sample().reshape(32, 8)      # 32 slices of 8 consecutive steps; batch["slice_id"] names them

    A slice never crosses an episode boundary: its rows share one ``traj_key`` value, no row but its last has
    ``end_key`` set, and it spans neither the write cursor (the newest row and the oldest are not consecutive)
    nor unwritten slots. Either key may be None (not both). Starts are drawn uniformly among the valid ones: the
    first sample after a write cuts the rows into episode segments from the stored columns (~7 ms per million
    rows), read in place from a RAM ring; a storage without one (``ZarrStorage(in_ram=False)``) is gathered
    whole through ``get``.
    With ``strict_length=False`` a slice may start at any row: past its episode's end it repeats the episode's last
    row, and ``info["mask"]`` is False on those repeated rows.
    """

    def __init__(
        self,
        slice_len: int,
        *,
        traj_key: str | tuple[str, ...] | None = "traj_id",
        end_key: str | tuple[str, ...] | None = ("next", "done"),
        strict_length: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if slice_len < 1:
            raise ConfigError(f"SliceSampler: slice_len must be >= 1, got {slice_len}")
        if traj_key is None and end_key is None:
            raise ConfigError("SliceSampler needs traj_key or end_key (or both) to find episode boundaries")
        self.slice_len = slice_len
        self.traj_key, self.end_key = traj_key, end_key
        self.strict_length = strict_length
        self.generator = generator
        self._cached_at: tuple[int, int] | None = None  # (storage, total_written) the segments describe
        # episode segments: first and last row (oldest first), and the slice starts in the segments before each
        self._begins = self._ends = self._before = np.zeros(0, dtype=np.int64)
        self._total = 0  # valid slice starts
        self._oldest = 0  # ring slot of row 0

    def _refresh(self, storage: Any) -> None:
        """Cut the rows held (oldest first) into episode segments and count each segment's slice starts."""
        size = len(storage)
        keys = [key for key in (self.traj_key, self.end_key) if key is not None]
        columns = dict(zip(keys, _columns_oldest_first(storage, keys), strict=True))
        last = np.zeros(size, dtype=bool)  # last[p]: row p (oldest first) ends a segment
        last[-1] = True  # the newest row: the next slot holds the oldest row, or nothing
        if self.traj_key is not None:
            traj = columns[self.traj_key].reshape(size)
            last[:-1] |= traj[1:] != traj[:-1]
        if self.end_key is not None:
            last |= columns[self.end_key].reshape(size).astype(bool)
        ends = np.flatnonzero(last)
        begins = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - begins + 1
        starts = np.maximum(lengths - (self.slice_len - 1 if self.strict_length else 0), 0)
        if not starts.any():
            raise StoreError(f"SliceSampler: no episode has slice_len={self.slice_len} consecutive rows yet (the "
                             f"storage holds {size} rows, the longest episode segment {int(lengths.max())}); wait "
                             "for more rows, lower slice_len, or pass strict_length=False")
        self._begins, self._ends, self._before = begins, ends, np.cumsum(starts) - starts
        self._total = int(starts.sum())
        self._oldest = _oldest_slot(storage)
        self._cached_at = (id(storage), storage.total_written)

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        n_slices, rest = divmod(batch_size, self.slice_len)
        if rest or n_slices == 0:
            raise ValueError(f"SliceSampler: batch_size={batch_size} must be a positive multiple of "
                             f"slice_len={self.slice_len}; pick batch_size = slices * slice_len")
        if len(storage) == 0:
            raise StoreError("cannot sample from an empty storage; wait for the first rows (min_fill)")
        if self._cached_at != (id(storage), storage.total_written):
            self._refresh(storage)
        u = torch.randint(self._total, (n_slices,), generator=self.generator).numpy()  # which valid start
        segment = np.searchsorted(self._before, u, side="right") - 1
        start = self._begins[segment] + u - self._before[segment]  # row number, oldest first
        room = np.minimum(self._ends[segment] - start + 1, self.slice_len)[:, None]  # rows left in the episode
        step = np.arange(self.slice_len)
        index = (self._oldest + start[:, None] + np.minimum(step, room - 1)) % storage.capacity
        info = {"slice_id": torch.arange(n_slices).repeat_interleave(self.slice_len)}
        if not self.strict_length:
            info["mask"] = torch.from_numpy((step < room).reshape(-1))
        return torch.from_numpy(index.reshape(-1)), info

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


class FifoSampler:
    """Queue mode: rows in write order, each exactly once (pair it with the rate limiter's queue mode).

    ::

        rb = ReplayBuffer(RamStorage(10_000), sampler=FifoSampler())
        rb.extend(rows)          # rows 0..99
        rb.sample(64)            # rows 0..63; the next batch, rows 64..127, waits for 28 more rows

    ``next_row`` counts the rows served, ever; row ``r`` (the ``r``-th written) lives in slot ``r % capacity``.
    Asking for rows not written yet, or for rows already overwritten, raises :class:`StoreError`: the rate
    limiter must keep the reader behind the writer and less than ``capacity`` rows behind.
    """

    def __init__(self) -> None:
        self.next_row = 0

    def sample(self, storage: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        written = storage.total_written
        if self.next_row + batch_size > written:
            raise StoreError(f"FifoSampler: asked for rows {self.next_row}..{self.next_row + batch_size - 1} but "
                             f"only {written} were written; pace the sampler with the rate limiter's queue mode")
        if written - self.next_row > storage.capacity:
            raise StoreError(f"FifoSampler: row {self.next_row} was overwritten ({written} rows written into "
                             f"capacity={storage.capacity}); the reader fell behind: raise the capacity or pace "
                             "the writer with the rate limiter's queue mode")
        index = (self.next_row + torch.arange(batch_size)) % storage.capacity
        self.next_row += batch_size
        return index, {}

    def state_dict(self) -> dict[str, Any]:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_row = state["next_row"]
