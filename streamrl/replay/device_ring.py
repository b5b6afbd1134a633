"""Replay rows on the learner's device: a mirror of the storage, and batches sent as indices into it.

A learner that runs its whole update from a CUDA graph cannot take a fresh host batch each step (a host-to-device
copy, a pinned buffer per batch). Instead the rows live on its device in a :class:`DeviceRing`, a mirror of the
storage preallocated at full capacity (its tensors never move, so a captured graph may read them), and the sampler
sends a :class:`RingBatch`: indices into the ring and the sampler's info, already on the device.

::

    ring = rb.mirror("cuda")          # filled with the rows the storage holds; every later extend writes it too
    rb.extend(chunk)                  # storage (the durable copy) and mirror
    rbatch = rb.sample_ring()         # RingBatch: index [B] on the device (UniformSampler draws it there)
    batch = rbatch.rows()             # the TensorDict rb.sample() would give for those indices, on the device

    # captured in a CUDA graph: a static index the sampler's indices are copied into, then
    batch = RingBatch(ring, static_index, static_info).rows()     # index_select per column, no host sync

The storage (RAM or zarr) stays the durable copy and the only one a checkpoint saves: a resumed buffer fills a new
mirror from it. :func:`as_batch` turns gathered rows into a batch (``index`` and info entries; trajectory rows
``[B]`` of ``[T]`` steps into ``[B, T]``): :meth:`ReplayBuffer.sample <streamrl.replay.buffer.ReplayBuffer.sample>`
and :meth:`RingBatch.rows` share it, so both give the same keys, shapes and dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import StoreError
from streamrl.replay.storage import gather_rows


def as_batch(rows: TensorDict, index: torch.Tensor, info: dict[str, torch.Tensor], *,
             trajectories: bool) -> TensorDict:
    """Gathered ``rows`` as a sampled batch: ``index`` and every ``info`` entry set as keys.

    With ``trajectories``, rows ``[B]`` of ``[T]`` steps become a batch ``[B, T]``; per-row entries (``index``,
    one-dimensional info) repeat along time. Only shape metadata and views: no host sync, no data-dependent shape.
    """
    if trajectories:
        rows.batch_size = next(iter(rows.values(include_nested=True, leaves_only=True))).shape[:2]
        info = {key: value.reshape(-1, *(1,) * (rows.batch_dims - 1)).expand(rows.batch_size)
                if value.ndim == 1 else value for key, value in info.items()}
        index = index[:, None].expand(rows.batch_size)
    rows.set("index", index)
    for key, value in info.items():
        rows.set(key, value)
    return rows


def _device(device: torch.device | str) -> torch.device:
    """``device`` with its index made explicit for CUDA (``cuda`` -> ``cuda:N``, the current one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class DeviceRing:
    """A mirror of a storage's rows on a device, preallocated at full capacity: its tensors never move, so a
    captured CUDA graph may read them.

    ::

        ring = DeviceRing(100_000, "cuda")
        ring.write(slots, rows)              # rows[i] -> slot slots[i] (the slots storage.extend returned)
        batch = ring.gather(index)           # TensorDict [len(index)] on ring.device

    ``rows`` is allocated by the first write, from its keys, dtypes and per-row shapes; later writes must have the
    same keys (values are cast to the ring's dtypes, as a storage casts them).
    """

    def __init__(self, capacity: int, device: torch.device | str, *, trajectories: bool = False) -> None:
        if capacity < 1:
            raise StoreError(f"DeviceRing: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = _device(device)
        self.trajectories = trajectories  # rows are [T]-step sub-trajectories: RingBatch.rows() gives [B, T]
        self.rows: TensorDict | None = None

    def _allocate(self, rows: TensorDictBase) -> TensorDict:
        ring = TensorDict({}, batch_size=[self.capacity], device=self.device)
        with torch.inference_mode(False):  # normal tensors: a learner trains on them
            for key, column in rows.items(include_nested=True, leaves_only=True):
                ring.set(key, torch.zeros((self.capacity, *column.shape[1:]), dtype=column.dtype, device=self.device))
        return ring

    def write(self, slots: torch.Tensor, rows: TensorDictBase) -> None:
        """Copy ``rows[i]`` to slot ``slots[i]``: one ``index_copy_`` per column, ``non_blocking``.

        ``slots`` are what ``storage.extend(rows)`` returned: a storage that kept only the newest rows of an extend
        larger than its ring returns their slots alone, so the newest ``len(slots)`` rows are written (and at most
        ``capacity``: duplicate slots in one ``index_copy_`` are undefined on CUDA).
        """
        if rows.batch_dims != 1:
            raise ValueError(f"DeviceRing.write takes rows with one batch dim, got batch_size="
                             f"{tuple(rows.batch_size)}; pass the rows given to storage.extend")
        keep = min(slots.shape[0], rows.shape[0], self.capacity)
        if keep == 0:
            return
        slots, rows = slots[-keep:], rows[rows.shape[0] - keep:]
        if self.rows is None:
            self.rows = self._allocate(rows)
        got = set(rows.keys(include_nested=True, leaves_only=True))
        want = set(self.rows.keys(include_nested=True, leaves_only=True))
        if got != want:
            raise StoreError(f"DeviceRing.write: rows have keys {sorted(map(str, got))}, the ring holds "
                             f"{sorted(map(str, want))}; every extend must carry the keys of the first one")
        slots = slots.to(self.device, torch.long, non_blocking=True)
        for key in want:
            column = self.rows.get(key)
            column.index_copy_(0, slots, rows.get(key).to(self.device, column.dtype, non_blocking=True))

    def gather(self, index: torch.Tensor) -> TensorDict:
        """The rows at ring slots ``index`` (``index_select`` per column), on :attr:`device`."""
        if self.rows is None:
            raise StoreError("DeviceRing.gather before any write: the mirror is empty; extend the buffer first")
        return gather_rows(self.rows, index.to(self.device, non_blocking=True))

    @staticmethod
    def row_bytes(rows: TensorDictBase) -> int:
        """Bytes one row of ``rows`` (batch dim first) takes: the sum over its entries."""
        return sum(DeviceRing.entry_bytes(rows).values())

    @staticmethod
    def entry_bytes(rows: TensorDictBase) -> dict[Any, int]:
        """Bytes one row takes in each entry of ``rows`` (batch dim first), by key."""
        sizes: dict[Any, int] = {}
        for key, column in rows.items(include_nested=True, leaves_only=True):
            assert isinstance(column, torch.Tensor)  # leaves
            sizes[key] = column[0].numel() * column.element_size()
        return sizes


@dataclass
class RingBatch:
    """What a sampler sends when rows live on the learner's device: indices into the ring + the sampler's info.

    ::

        batch = ring_batch.rows()      # eagerly: a TensorDict like ReplayBuffer.sample's, on ring.device
    """

    ring: DeviceRing
    index: torch.Tensor  # [B] long on ring.device
    info: dict[str, torch.Tensor]  # e.g. {"weight": ...} on ring.device

    def rows(self) -> TensorDict:
        """``ring.gather(index)`` plus ``index`` and the info entries: the keys, shapes and values
        ``ReplayBuffer.sample`` gives for these indices. Device ops only (no host sync): safe to capture."""
        return as_batch(self.ring.gather(self.index), self.index, dict(self.info),
                        trajectories=self.ring.trajectories)

    @property
    def batch_size(self) -> torch.Size:
        """The batch size of :meth:`rows` (``[B]``, or ``[B, T]`` for trajectory rows), without gathering."""
        if self.ring.trajectories and self.ring.rows is not None:
            steps = next(iter(self.ring.rows.values(include_nested=True, leaves_only=True))).shape[1]
            return torch.Size([self.index.shape[0], steps])
        return torch.Size([self.index.shape[0]])


@runtime_checkable
class DeviceSampler(Protocol):
    """A sampler that can draw ring slots on a device (``UniformSampler``); others draw on the host."""

    def sample_on(self, storage: Any, batch_size: int,
                  device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
