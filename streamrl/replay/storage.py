"""Replay storages: where rows live. One narrow interface, two implementations.

::

    storage = RamStorage(capacity=100_000)          # or ZarrStorage(capacity=100_000, path="replay.zarr")
    index = storage.extend(rows)                    # rows: a TensorDict with one batch dim
    batch = storage.get(index[:4])                  # gathered with index_select, never through zarr
    len(storage), storage.state_dict()

Storages are created lazily from the first rows: their keys (nested allowed), shapes and dtypes fix the layout.
A storage is a ring: once ``capacity`` rows were written, new rows overwrite the oldest.

:class:`ZarrStorage` keeps every row in a RAM ring (sampling speed) and writes it to a zarr v3 group on disk in
whole, chunk-aligned blocks of ``block_rows`` rows, all keys of a block together; after a block's data is written,
the group attribute ``committed`` advances. Readers trust committed rows only. Any zarr reader opens the group::

    g = zarr.open_group("run/replay.zarr", mode="r")
    g["next/reward"][: g.attrs["committed"]["size"]]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import StoreError

FORMAT = "streamrl.replay/1"


class RamStorage:
    """A preallocated ring of rows in RAM (torch tensors, CPU)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"storage capacity must be >= 1, got {capacity}")
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
        index = index.to(torch.long)
        rows = self.data.apply(lambda t: t.index_select(0, index), batch_size=[index.shape[0]])
        assert rows is not None
        return rows

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "size": self.size, "total_written": self.total_written,
                "data": None if self.data is None else self.data[: self.size].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["data"] is not None:
            self._allocate(state["data"])
            assert self.data is not None
            self.data[: state["size"]] = state["data"]
        self.cursor, self.size, self.total_written = state["cursor"], state["size"], state["total_written"]

    def close(self) -> None:
        """Nothing to release."""


def _key_path(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else "/".join(key)


class ZarrStorage:
    """A RAM ring mirrored block by block into a zarr v3 group; see the module docstring.

    ``path=None`` puts the group at ``<run dir>/replay.zarr`` (the writer stage calls :meth:`attach`).
    ``fsync=True`` syncs written chunk files before the commit, for power-loss durability.
    """

    def __init__(
        self,
        capacity: int,
        *,
        path: str | Path | None = None,
        block_rows: int = 4096,
        fsync: bool = False,
    ) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.ram = RamStorage(capacity)
        self.capacity = capacity
        self.block_rows = min(block_rows, capacity)
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        self.group: Any = None
        self.arrays: dict[str, Any] = {}
        self.committed_rows = 0  # rows (ever written) that are on disk and committed

    # -- the file ------------------------------------------------------------------------------------------
    def attach(self, run_dir: Path) -> None:
        """Resolve a relative or missing path against the run directory."""
        if self.path is None:
            self.path = run_dir / "replay.zarr"
        elif not self.path.is_absolute():
            self.path = run_dir / self.path

    def _create(self, rows: TensorDictBase) -> None:
        import zarr

        if self.path is None:
            raise StoreError("ZarrStorage has no path: pass path= or run it in a pipeline (the writer attaches it)")
        self.group = zarr.open_group(str(self.path), mode="w")
        for key, leaf in rows.items(include_nested=True, leaves_only=True):
            name = _key_path(key)
            shape = (self.capacity, *leaf.shape[1:])
            array = self.group.create_array(
                name, shape=shape, chunks=(self.block_rows, *leaf.shape[1:]), dtype=_numpy_dtype(leaf.dtype),
                fill_value=0,
            )
            self.arrays[name] = array.with_config({"write_empty_chunks": True})
        self.group.attrs.update({"format": FORMAT, "capacity": self.capacity, "block_rows": self.block_rows,
                                 "keys": sorted(self.arrays), "committed": self._commit_record()})

    def _commit_record(self) -> dict[str, int]:
        rows = self.committed_rows
        return {"rows": rows, "cursor": rows % self.capacity, "size": min(rows, self.capacity)}

    # -- storage interface ---------------------------------------------------------------------------------
    def extend(self, rows: TensorDictBase) -> torch.Tensor:
        if self.group is None:
            self._create(rows)
        return self.ram.extend(rows)

    def get(self, index: torch.Tensor) -> TensorDict:
        return self.ram.get(index)

    def __len__(self) -> int:
        return len(self.ram)

    @property
    def pending_rows(self) -> int:
        return self.ram.total_written - self.committed_rows

    def flush(self, *, partial: bool = False) -> int:
        """Write every complete block (and, with ``partial``, the incomplete last one), then commit.

        Blocking (file I/O): call it from a thread, as the writer stage does. Returns rows committed.
        """
        if self.group is None or self.ram.data is None:
            return 0
        total = self.ram.total_written
        if total - self.committed_rows > self.capacity:
            raise StoreError(
                f"{total - self.committed_rows} rows are waiting for a flush but the ring holds {self.capacity}; "
                "flush after every extend (the writer stage does) or raise the capacity"
            )
        end = total if partial else (total // self.block_rows) * self.block_rows
        start = self.committed_rows
        flat = dict(self.ram.data.items(include_nested=True, leaves_only=True))
        while start < end:
            ring = start % self.capacity
            block_end = min(end, (start // self.block_rows + 1) * self.block_rows, start + self.capacity - ring)
            n = block_end - start
            for key, leaf in flat.items():
                self.arrays[_key_path(key)][ring:ring + n] = leaf[ring:ring + n].numpy()
            start = block_end
        if end > self.committed_rows:
            if self.fsync:
                _fsync_tree(self.path)
            self.committed_rows = end
            self.group.attrs["committed"] = self._commit_record()
        return end

    def close(self) -> None:
        """Flush what is left (a partial block too) and commit."""
        self.flush(partial=True)

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "committed_rows": self.committed_rows,
                "ram": {k: v for k, v in self.ram.state_dict().items() if k != "data"}}

    @classmethod
    def open(cls, path: str | Path) -> ZarrStorage:
        """Reopen a store: load its committed rows into RAM and resume writing after them."""
        import zarr

        path = Path(path)
        if not path.exists():
            raise StoreError(f"no replay store at {str(path)!r}")
        group = zarr.open_group(str(path), mode="r+")
        attrs: dict[str, Any] = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{str(path)!r} is not a streamrl replay store (format={attrs.get('format')!r})")
        store = cls(attrs["capacity"], path=path, block_rows=attrs["block_rows"])
        store.group = group
        committed = attrs["committed"]
        size, cursor = committed["size"], committed["cursor"]
        arrays: dict[str, Any] = {name: group[name].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
                                  for name in attrs["keys"]}
        store.arrays = arrays
        if size:
            data = {}
            for name, array in arrays.items():
                data[tuple(name.split("/"))] = torch.from_numpy(np.asarray(array[:size]))
            rows = TensorDict({}, batch_size=[size])
            for key, value in data.items():
                rows.set(key if len(key) > 1 else key[0], value)
            store.ram._allocate(rows)
            assert store.ram.data is not None
            store.ram.data[:size] = rows
        store.ram.size, store.ram.cursor = size, cursor
        store.ram.total_written = committed["rows"]
        store.committed_rows = committed["rows"]
        return store


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _fsync_tree(path: Path | None) -> None:
    if path is None:
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
