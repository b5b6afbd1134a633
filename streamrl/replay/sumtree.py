"""A sum-tree (and its twin min-tree) over ``capacity`` leaves, for proportional sampling.

::

    tree = SumTree(capacity=1_000_000)
    tree.update(np.array([3, 7, 3]), np.array([1.0, 2.0, 0.5]))   # repeated index: the last write wins
    tree.total, tree.min                                           # 2.5, 0.5 (min over the leaves ever set)
    leaves = tree.find(rng.random(256) * tree.total)               # leaf i where cumsum[i-1] <= q < cumsum[i]

The trees are flat float64 numpy arrays in heap order: node ``k`` has children ``2k`` and ``2k + 1``, the root is
node 1 and leaf ``i`` is node ``size + i`` (``size``: ``capacity`` rounded up to a power of two; padding leaves
hold 0 in the sum-tree and +inf in the min-tree). ``update`` and ``find`` walk the ``log2(size)`` levels once for
the whole batch, with no per-element Python loop. Parents are recomputed from their children, never adjusted by
deltas, so sums do not drift. Numpy rather than torch: at batch 256 a level costs a few numpy calls of ~1 µs
each, where torch's per-call overhead made the same walk 5-8x slower. Capacity 1M, batch 256, one loaded CPU
core: ``update`` ~0.19 ms (torch: ~1.2 ms), ``find`` ~0.15 ms (torch: ~0.65 ms). The min-tree costs a third of
``update`` and makes ``min`` O(1), where ``np.min`` over a million leaves took ~0.1 ms on every sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from streamrl.errors import ConfigError


class SumTree:
    """Sums (and minima) of leaf values, updated and searched a batch at a time; see the module docstring."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"SumTree capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.depth = (capacity - 1).bit_length()
        self.size = 1 << self.depth
        self.sums = np.zeros(2 * self.size)
        self.mins = np.full(2 * self.size, np.inf)

    @property
    def total(self) -> float:
        """Sum of all leaves."""
        return float(self.sums[1])

    @property
    def min(self) -> float:
        """Smallest value among the leaves ever set; +inf before the first update."""
        return float(self.mins[1])

    def __getitem__(self, indices: npt.ArrayLike) -> np.ndarray:
        """Leaf values."""
        return self.sums[self.size + np.asarray(indices, dtype=np.int64)]

    def update(self, indices: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Set leaves ``indices`` to ``values`` (an index given twice takes its last value)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
        if indices.size and (indices.min() < 0 or indices.max() >= self.capacity):
            raise IndexError(f"SumTree: leaf indices must be in [0, {self.capacity}), got "
                             f"min={indices.min()}, max={indices.max()}")
        _, last = np.unique(indices[::-1], return_index=True)  # numpy leaves repeated-index assignment unordered
        keep = indices.size - 1 - last
        nodes, values = indices[keep] + self.size, values[keep]
        self.sums[nodes] = values
        self.mins[nodes] = values
        for _ in range(self.depth):  # a parent named twice gets the same value twice: no dedup needed
            nodes >>= 1
            left = nodes << 1
            self.sums[nodes] = self.sums[left] + self.sums[left + 1]
            self.mins[nodes] = np.minimum(self.mins[left], self.mins[left + 1])

    def find(self, prefix_sums: npt.ArrayLike) -> np.ndarray:
        """For each query ``q`` in ``[0, total)``, the leaf ``i`` with ``sum(leaves[:i]) <= q < sum(leaves[:i+1])``.

        The walk never enters an empty subtree, so a query rounded up to ``total`` lands on the last positive leaf.
        """
        query = np.array(prefix_sums, dtype=np.float64).reshape(-1)
        nodes = np.ones(query.shape, dtype=np.int64)
        for _ in range(self.depth):
            nodes <<= 1
            left = self.sums[nodes]
            right = (query >= left) & (self.sums[nodes + 1] > 0)
            query -= left * right
            nodes += right
        return nodes - self.size

    def state_dict(self) -> dict[str, Any]:
        """The leaves and which were ever set: a set leaf's min equals its sum, an unset one's is +inf, which is
        left out (a checkpoint holds only finite tensors)."""
        leaves = slice(self.size, self.size + self.capacity)
        return {"capacity": self.capacity, "sums": torch.from_numpy(self.sums[leaves].copy()),
                "set": torch.from_numpy(self.mins[leaves] < np.inf)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"SumTree: state has capacity={state['capacity']}, this tree {self.capacity}")
        sums = state["sums"].numpy()
        self.sums[self.size:self.size + self.capacity] = sums
        self.mins[self.size:self.size + self.capacity] = np.where(state["set"].numpy(), sums, np.inf)
        for level in range(self.depth - 1, -1, -1):  # rebuild every internal node, deepest level first
            lo, hi = 1 << level, 2 << level
            self.sums[lo:hi] = self.sums[2 * lo:2 * hi:2] + self.sums[2 * lo + 1:2 * hi:2]
            self.mins[lo:hi] = np.minimum(self.mins[2 * lo:2 * hi:2], self.mins[2 * lo + 1:2 * hi:2])
