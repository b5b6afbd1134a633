"""The replay buffer: a storage, a sampler and a rate limiter composed.

::

    rb = ReplayBuffer(RamStorage(100_000), batch_size=256)
    rb.extend(chunk)                  # a chunk [num_envs, time] is flattened into rows (transitions)
    batch = rb.sample()               # TensorDict [256] with an "index" entry (ring positions)

    rb = ReplayBuffer(RamStorage(1_000), batch_size=8, trajectories=True)
    rb.extend(chunk)                  # one row per env: its `time` steps, stored as a [capacity, time] ring
    batch = rb.sample()               # TensorDict [8, time]: whole sub-trajectories (for TD(lambda), GAE, ...)

In a pipeline, a writer stage and a sampler stage share one buffer; its limiter paces them.

Rows on the learner's device (:mod:`streamrl.replay.device_ring`): ``mirror(device)`` creates a
:class:`~streamrl.replay.device_ring.DeviceRing` filled with the rows the storage holds, which every later
``extend`` writes too; ``sample_ring()`` then returns a :class:`~streamrl.replay.device_ring.RingBatch` (indices
into the mirror, drawn on its device by a ``UniformSampler``, moved there from the host by other samplers)::

    ring = rb.mirror("cuda")
    batch = rb.sample_ring().rows()   # what rb.sample() gives for those indices, gathered on the device

The storage stays the durable copy: the mirror is derived, never in ``state_dict``; a resumed buffer (a
``load_state_dict`` after ``mirror``) refills it from the storage.

Resuming: ``load_state_dict`` restores the limiter's counters, the sampler and the storage. A zarr store's path is
recorded relative to the run directory it lies in, so such a state is loaded when the writer stage calls
``attach(run_dir)`` (until then ``state_dict`` returns the state as given). If the store holds fewer
rows than the state counts (a damaged store that was repaired, a checkpoint of an older streamrl that counted
rows before they were committed), the buffer follows the store: the limiter forgets the inserts of the rows
that are gone (and, in ratio mode, the samples they paid for), the sampler forgets them, and a warning says how
many rows were lost. The run goes on with the rows the store holds instead of failing on every retry.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.errors import StoreError
from streamrl.replay.device_ring import DeviceRing, DeviceSampler, RingBatch, as_batch
from streamrl.replay.ratelimit import RateLimiter
from streamrl.replay.samplers import FifoSampler, Sampler, SamplerWithoutReplacement, UniformSampler, slots_oldest_first
from streamrl.replay.storage import Storage


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
        storage: Storage,
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
        self._restored: dict[str, Any] | None = None  # a state waiting for attach (see the module docstring)
        self.ring: DeviceRing | None = None  # the mirror on the learner's device (see mirror)

    def attach(self, run_dir: Path) -> None:
        """Resolve the storage's path against the run directory, then load a state that waited for it."""
        self.storage.attach(run_dir)
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None  # kept until loaded: a checkpoint after a failed load saves it unchanged

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
        else:
            rows = transitions(data)
        slots = self.storage.extend(rows)
        if self.ring is not None:
            self.ring.write(slots, rows)
        return slots

    def rows_for(self, data: TensorDictBase) -> int:
        """How many rows :meth:`extend` will store from ``data`` (what the rate limiter counts)."""
        if self.trajectories:
            return data.batch_size[0]
        valid = data.get("valid", None)
        return int(valid.sum()) if valid is not None else data.batch_size.numel()

    def sample(self, batch_size: int | None = None) -> TensorDict:
        index, info = self.sampler.sample(self.storage, batch_size or self.batch_size)
        return as_batch(self.storage.get(index), index, info, trajectories=self.trajectories)

    def mirror(self, device: torch.device | str) -> DeviceRing:
        """Mirror the rows on ``device``: a :class:`DeviceRing` filled with the rows the storage holds, written by
        every later :meth:`extend`. Calling it again returns the mirror (a new one for another device)."""
        ring = DeviceRing(self.storage.capacity, device, trajectories=self.trajectories)  # allocates on write
        if self.ring is None or self.ring.device != ring.device:
            self.ring = ring
            self._fill_mirror()
        return self.ring

    def _fill_mirror(self) -> None:
        """Copy the rows the storage holds into the mirror (after ``mirror``, or a resume that replaced them)."""
        assert self.ring is not None
        if len(self.storage):
            slots = slots_oldest_first(self.storage)
            self.ring.write(slots, self.storage.get(slots))

    def sample_ring(self, batch_size: int | None = None) -> RingBatch:
        """A :class:`RingBatch` of ``batch_size`` rows of the mirror: a ``UniformSampler`` draws the indices on the
        mirror's device without a host sync; other samplers draw on the host and the indices move there."""
        ring = self.ring
        if ring is None:
            raise StoreError("ReplayBuffer.sample_ring needs a mirror on the learner's device; call "
                             "buffer.mirror(device) first (or use sample() for host batches)")
        n = batch_size or self.batch_size
        if isinstance(self.sampler, DeviceSampler):
            index, info = self.sampler.sample_on(self.storage, n, ring.device)
        else:
            index, info = self.sampler.sample(self.storage, n)
            index = index.to(ring.device, non_blocking=True)
        info = {key: value.to(ring.device, non_blocking=True) for key, value in info.items()}
        return RingBatch(ring, index, info)

    def __len__(self) -> int:
        return len(self.storage)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; with a zarr store at a path relative to a run directory not attached yet, at
        :meth:`attach`."""
        if self.storage.needs_run_dir(state["storage"]):
            self._restored = state
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        self.limiter.load_state_dict(state["limiter"])
        self.storage.load_state_dict(state["storage"])
        if "sampler" in state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        lost = state["storage"]["total_written"] - self.storage.total_written
        if lost > 0:
            self._forget(lost)
        if self.ring is not None:  # the storage holds other rows now: the mirror follows
            self._fill_mirror()

    def _forget(self, lost: int) -> None:
        """The store lacks the newest ``lost`` rows the state counted: follow the store (module docstring)."""
        limiter, storage = self.limiter, self.storage
        warnings.warn(f"the replay store at {storage.path} holds {storage.total_written} rows, "
                      f"{lost} fewer than the checkpoint counts (it was damaged and repaired, or the checkpoint "
                      "counted rows before they were committed); the run goes on with the rows it holds",
                      stacklevel=3)
        limiter.inserts = max(0, limiter.inserts - lost)
        if limiter.queue_capacity is not None:  # a queue has not served more rows than it holds
            limiter.samples = min(limiter.samples, limiter.inserts)
        elif limiter.samples_per_insert is not None:  # keep diff: the lost rows' samples are forgotten with them
            limiter.samples = max(0, limiter.samples - round(lost * limiter.samples_per_insert))
        if isinstance(self.sampler, FifoSampler):
            self.sampler.next_row = min(self.sampler.next_row, storage.total_written)
        elif isinstance(self.sampler, SamplerWithoutReplacement):
            self.sampler.order = None  # its epoch named slots that may no longer hold rows: start a new one
        # PrioritizedSampler and SliceSampler rebuild from storage.total_written when it went back

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:
            return self._restored
        state: dict[str, Any] = {"limiter": self.limiter.state_dict(), "storage": self.storage.state_dict()}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state
