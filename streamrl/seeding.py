"""Seeds and RNG states of a process: torch's, numpy's and Python's global generators.

::

    seed_everything(0)
    state = rng_state()        # plain tensors and containers: a checkpoint saves it
    ...
    restore_rng(state)         # the same random streams again
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global RNG states, as tensors and plain containers (a checkpoint loads them
    with ``torch.load(weights_only=True)``: numpy's key array travels as an int64 tensor)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # legacy=True: the MT19937 key array
    numpy_state = {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def restore_rng(state: dict[str, Any]) -> None:
    """Set torch's, numpy's and Python's RNGs to what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
