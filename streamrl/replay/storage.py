"""Replay storages: where rows live. One narrow interface (:class:`Storage`), two implementations.

::

    storage = RamStorage(capacity=100_000)          # or ZarrStorage(100_000, path="replay.zarr"): zarr_store.py
    index = storage.extend(rows)                    # rows: a TensorDict with one batch dim -> their ring slots
    batch = storage.get(index[:4])                  # gathered with index_select
    len(storage), storage.cursor, storage.total_written, storage.state_dict()

Storages are created lazily from the first rows: their keys (nested allowed), shapes and dtypes fix the layout.
A storage is a ring: once ``capacity`` rows were written, new rows overwrite the oldest. Samplers draw ring slots.

The buffer and the writer stage speak to any storage through :class:`Storage`, never asking which class it is.
Its durability half (``attach``, ``pending_rows``, ``flush``, ...) is what a store on disk needs: ``RamStorage``
implements it as no-ops (nothing is ever pending), ``ZarrStorage`` for real. A storage of your own satisfies the
protocol by having its members; no base class is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import ConfigError, StoreError


class Storage(Protocol):
    """What a replay buffer, its samplers and the writer stage need of a storage.

    The ring (samplers): ``capacity``, ``cursor`` (the next slot written), ``total_written`` (rows ever written),
    ``len`` (rows held), ``extend`` and ``get``; ``ram_rows`` is the slot-indexed TensorDict of every row when all
    are in RAM (samplers read columns in place), else ``None``.

    Durability (the writer stage): ``durable`` says whether rows go to disk at all. Rows that ``extend`` took wait
    in RAM (``pending_rows``) until ``flush`` commits them; ``flush_due`` says a flush is worth its trip to a
    thread now (a whole block waits, or the oldest pending row waited its time: ``commit_due``, which comes in
    ``seconds_to_commit``). ``attach(run_dir)`` tells the storage the run directory (where a store without a path
    goes, and what a recorded path is relative to); ``needs_run_dir(state)`` says whether loading ``state`` must
    wait for it. ``path`` is where the rows lie on disk (``None`` in RAM). ``close`` flushes and releases.
    """

    capacity: int
    total_written: int
    durable: ClassVar[bool]

    @property
    def cursor(self) -> int: ...

    @property
    def path(self) -> Path | None: ...

    @property
    def pending_rows(self) -> int: ...

    @property
    def ram_rows(self) -> TensorDict | None: ...

    def __len__(self) -> int: ...

    def extend(self, rows: TensorDictBase) -> torch.Tensor: ...

    def get(self, index: torch.Tensor) -> TensorDict: ...

    def attach(self, run_dir: Path) -> None: ...

    def commit_due(self) -> bool: ...

    def seconds_to_commit(self) -> float: ...

    def flush_due(self) -> bool: ...

    def flush(self, *, partial: bool = False) -> int: ...

    def needs_run_dir(self, state: dict[str, Any]) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def gather_rows(data: TensorDict, index: torch.Tensor) -> TensorDict:
    """The rows of ``data`` at ``index``: one ``index_select`` per column, built into a TensorDict from a nested
    dict (about half the per-call cost of ``data.apply``, which matters at a sample per learner update)."""
    index = index.to(torch.long)
    nested: dict[str, Any] = {}
    for key, column in data.items(include_nested=True, leaves_only=True):
        assert isinstance(column, torch.Tensor)
        rows = column.index_select(0, index)
        if isinstance(key, tuple):
            level = nested
            for part in key[:-1]:
                level = level.setdefault(part, {})
            level[key[-1]] = rows
        else:
            nested[key] = rows
    return TensorDict(nested, batch_size=index.shape[:1], device=data.device)


class RamStorage:
    """A preallocated ring of rows in RAM (torch tensors, CPU). Not durable: its :class:`Storage` durability
    members are no-ops (no row is ever pending; a checkpoint holds the rows themselves)."""

    durable: ClassVar[bool] = False
    path: None = None
    pending_rows = 0

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"storage capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.data: TensorDict | None = None
        self.cursor = 0  # next row to write
        self.size = 0  # rows holding data
        self.total_written = 0

    def _allocate(self, rows: TensorDictBase) -> None:
        cap = self.capacity
        with torch.inference_mode(False):  # normal tensors, even in a collection-only process: they get trained on
            self.data = rows.apply(lambda t: torch.zeros((cap, *t.shape[1:]), dtype=t.dtype), batch_size=[cap])

    def extend(self, rows: TensorDictBase) -> torch.Tensor:
        """Write ``rows`` (batch dim first) at the cursor; return the ring indices they went to."""
        if rows.batch_dims != 1:
            raise ValueError(f"extend takes rows with one batch dim, got batch_size={tuple(rows.batch_size)}; "
                             "flatten chunks first (ReplayBuffer.extend does)")
        n = rows.shape[0]
        if self.data is None:
            self._allocate(rows)
        assert self.data is not None
        if n > self.capacity:
            rows = rows[n - self.capacity:]
            self.total_written += n - self.capacity
            self.cursor = (self.cursor + n - self.capacity) % self.capacity
            n = self.capacity
        start = self.cursor
        end = start + n
        if end <= self.capacity:
            self.data[start:end] = rows
        else:
            split = self.capacity - start
            self.data[start:] = rows[:split]
            self.data[: n - split] = rows[split:]
        self.cursor = end % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.total_written += n
        return torch.arange(start, start + n) % self.capacity

    def get(self, index: torch.Tensor) -> TensorDict:
        if self.data is None:
            raise StoreError("the storage is empty: extend it before sampling")
        return gather_rows(self.data, index)

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, Any]:
        """Counters and the rows held, as a nested dict of tensors (a checkpoint holds no TensorDict: it loads with
        ``torch.load(weights_only=True)``). The rows are copied: a view would save the whole ring's storage."""
        return {"cursor": self.cursor, "size": self.size, "total_written": self.total_written,
                "data": None if self.data is None else self.data[: self.size].clone().to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["data"] is not None:
            rows = TensorDict(state["data"], batch_size=[state["size"]])
            self._allocate(rows)
            assert self.data is not None
            self.data[: state["size"]] = rows
        self.cursor, self.size, self.total_written = state["cursor"], state["size"], state["total_written"]

    @property
    def ram_rows(self) -> TensorDict | None:
        return self.data

    def attach(self, run_dir: Path) -> None:
        """Nothing lies in the run directory."""

    def commit_due(self) -> bool:
        return False

    def seconds_to_commit(self) -> float:
        return math.inf

    def flush_due(self) -> bool:
        return False

    def flush(self, *, partial: bool = False) -> int:
        """Nothing to write: every row is as durable as it gets. Returns the rows written."""
        return self.total_written

    def needs_run_dir(self, state: dict[str, Any]) -> bool:
        return False

    def close(self) -> None:
        """Nothing to release."""
