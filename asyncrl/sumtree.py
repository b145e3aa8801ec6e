"""A sum-tree over replay slots: priority updates and proportional sampling, vectorised."""

from __future__ import annotations

import numpy as np


class SumTree:
    """Non-negative leaf values in a binary tree whose internal nodes hold the sum of their two
    children, so that drawing a leaf with probability ``value / total`` is one descent.

    One array: node ``i`` has children ``2i`` and ``2i + 1``, the root is node 1, and the
    ``capacity`` leaves sit at ``[P:]`` with P the capacity rounded up to a power of two (so every
    leaf has the same depth; the padding leaves stay 0 and are never drawn).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a sum-tree needs at least one leaf, got capacity={capacity}")
        self.capacity = capacity
        self._depth = (capacity - 1).bit_length()
        self._first_leaf = 1 << self._depth
        self.tree = np.zeros(2 * self._first_leaf)
        self._num_nonzero = 0

    @property
    def total(self) -> float:
        return float(self.tree[1])

    @property
    def num_nonzero(self) -> int:
        """Leaves that can be drawn."""
        return self._num_nonzero

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.tree[self._leaf_nodes(indices)]

    def update(self, indices: np.ndarray, values: np.ndarray | float) -> None:
        """Set leaves (where an index repeats, its last value wins) and their ancestors."""
        nodes = self._leaf_nodes(indices)
        values = np.broadcast_to(np.asarray(values, np.float64), nodes.shape)
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError("sum-tree values must be finite and >= 0")
        # np.unique keeps first occurrences: search the reversed arrays so the last write wins.
        nodes, last = np.unique(nodes[::-1], return_index=True)
        values = values[::-1][last]
        self._num_nonzero += np.count_nonzero(values) - np.count_nonzero(self.tree[nodes])
        self.tree[nodes] = values
        # Each parent is recomputed from its children, never adjusted by a delta, so the sums
        # cannot drift however many updates there are. Siblings share a parent, which is then
        # written twice with the same sum: cheaper than deduplicating every level (np.unique
        # sorts, and made inserts 4-5x slower).
        for _ in range(self._depth):
            nodes = nodes >> 1
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]

    def sample(self, n: int, rng: np.random.Generator, batches: int = 1) -> np.ndarray:
        """``n`` leaf indices, one drawn in each of ``n`` equal strata of the total (lower variance
        than independent draws; the result comes sorted by leaf).

        ``batches`` > 1 gives that many such draws of ``n`` one after the other, each stratified
        over the whole total on its own: one stratified pass of ``batches * n`` would hand each
        consecutive block of ``n`` only a slice of the leaves. They are the draws that as many
        calls would make, from the same random numbers, in one descent."""
        total = self.tree[1]
        if not total > 0:
            raise ValueError("cannot sample from a sum-tree whose values are all 0")
        u = ((np.arange(n) + rng.random((batches, n))) * (total / n)).reshape(-1)
        n = batches * n
        u = np.minimum(u, np.nextafter(total, 0))  # rounding may reach the total itself
        nodes = np.ones(n, np.int64)
        for _ in range(self._depth):
            left = 2 * nodes
            left_sum = self.tree[left]
            # A boundary hit or rounding in ``u - left_sum`` may point past the last nonzero leaf
            # of a subtree; going left when the right is empty keeps every step on a nonzero node.
            go_right = (u >= left_sum) & (self.tree[left + 1] > 0)
            u = np.where(go_right, u - left_sum, u)
            nodes = left + go_right
        return nodes - self._first_leaf

    def _leaf_nodes(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.capacity):
            raise IndexError(f"leaf indices must lie in [0, {self.capacity})")
        return indices + self._first_leaf
