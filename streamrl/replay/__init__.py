"""Replay: storages (where rows live), samplers (which rows to read), the buffer that joins them, and rate limits.

::

    from streamrl.replay import PrioritizedSampler, RamStorage, ReplayBuffer
    rb = ReplayBuffer(RamStorage(capacity=100_000), sampler=PrioritizedSampler(alpha=0.6, beta=0.4))
    rb.extend(rows)                                  # a TensorDict with one batch dim
    batch = rb.sample(256)                           # batch["index"], batch["weight"]

    from streamrl.replay import MultiStep, ZarrStorage
    storage = ZarrStorage(1_000_000, path="replay.zarr")   # on disk, committed in blocks, reopened on resume

:class:`Storage` and :class:`Sampler` are the protocols to implement for a storage or sampler of your own.
Names are imported lazily (PEP 562): ``import streamrl.replay`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

_EXPORTS: dict[str, str] = {
    "FifoSampler": "streamrl.replay.samplers",
    "MultiStep": "streamrl.replay.multistep",
    "PrioritizedSampler": "streamrl.replay.samplers",
    "RamStorage": "streamrl.replay.storage",
    "RateLimiter": "streamrl.replay.ratelimit",
    "ReplayBuffer": "streamrl.replay.buffer",
    "Sampler": "streamrl.replay.samplers",
    "SamplerWithoutReplacement": "streamrl.replay.samplers",
    "SliceSampler": "streamrl.replay.samplers",
    "Storage": "streamrl.replay.storage",
    "SumTree": "streamrl.replay.sumtree",
    "UniformSampler": "streamrl.replay.samplers",
    "ZarrStorage": "streamrl.replay.zarr_store",
}

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from streamrl.replay.buffer import ReplayBuffer
    from streamrl.replay.multistep import MultiStep
    from streamrl.replay.ratelimit import RateLimiter
    from streamrl.replay.samplers import (
        FifoSampler,
        PrioritizedSampler,
        Sampler,
        SamplerWithoutReplacement,
        SliceSampler,
        UniformSampler,
    )
    from streamrl.replay.storage import RamStorage, Storage
    from streamrl.replay.sumtree import SumTree
    from streamrl.replay.zarr_store import ZarrStorage


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
