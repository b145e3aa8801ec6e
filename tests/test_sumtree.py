import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.sumtree import SumTree


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def assert_frequencies_match(tree: SumTree, values: np.ndarray, draws: int, seed: int = 0):
    leaves = tree.sample(draws, np.random.default_rng(seed))
    counts = np.bincount(leaves, minlength=len(values))
    assert counts[values == 0].sum() == 0
    nonzero = values > 0
    expected = draws * values[nonzero] / values.sum()
    df = nonzero.sum() - 1
    # Stratified draws vary less than independent ones, so a 5-sigma chi-square bound is loose.
    assert chi_square(counts[nonzero], expected) <= df + 5 * np.sqrt(2 * df)


@pytest.mark.parametrize("capacity", [1, 2, 7, 100])
def test_sampling_frequencies_follow_values(capacity):
    values = np.random.default_rng(capacity).uniform(0.1, 5.0, capacity)
    values[::3] = 0.0
    if not values.any():
        values[-1] = 1.0
    tree = SumTree(capacity)
    tree.update(np.arange(capacity), values)
    assert_frequencies_match(tree, values, draws=20_000)


def test_updates_change_frequencies_and_later_duplicates_win():
    tree = SumTree(5)
    tree.update(np.arange(5), np.ones(5))
    tree.update([2, 0, 2, 4], [7.0, 0.0, 3.0, 0.0])  # leaf 2 ends at 3.0
    values = np.array([0.0, 1.0, 3.0, 1.0, 0.0])
    np.testing.assert_array_equal(tree.get(np.arange(5)), values)
    assert tree.total == 5.0 and tree.num_nonzero == 3
    assert_frequencies_match(tree, values, draws=10_000)


class BoundaryRng:
    """Draws only the extremes of [0, 1), where rounding sends a descent astray."""

    def __init__(self, value: float):
        self.value = value

    def random(self, n):
        return np.full(n, self.value)


@pytest.mark.parametrize("value", [0.0, np.nextafter(1.0, 0.0)])
def test_never_returns_a_zero_leaf_at_float_edges(value):
    rng = np.random.default_rng(1)
    for _ in range(200):
        capacity = int(rng.integers(1, 40))
        values = rng.choice([0.0, 0.1, 0.2, 0.3, 1e-300, 1e300, 7.0], capacity)
        if not values.any():
            continue
        tree = SumTree(capacity)
        tree.update(np.arange(capacity), values)
        for n in (1, 3, 64):
            leaves = tree.sample(n, BoundaryRng(value))
            assert (values[leaves] > 0).all()


def test_rounding_never_sends_the_descent_into_an_empty_subtree():
    # Found by search: with u just below the total, u - left_sum rounds up to the right subtree's
    # sum, and an unguarded descent ends on the padding leaf 7.
    values = np.array([0.2, 0.7, 0.0, 0.1, 1.1, 55.2, 66.9])
    tree = SumTree(len(values))
    tree.update(np.arange(len(values)), values)
    assert tree.sample(1, BoundaryRng(np.nextafter(1.0, 0.0)))[0] == 6


def test_empty_tree_and_bad_input_raise():
    tree = SumTree(4)
    with pytest.raises(ValueError):
        tree.sample(1, np.random.default_rng(0))
    tree.update([1], [2.0])
    tree.update([1], [0.0])
    with pytest.raises(ValueError):
        tree.sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        tree.update([0], [np.nan])
    with pytest.raises(ValueError):
        tree.update([0], [-1.0])
    with pytest.raises(IndexError):
        tree.update([4], [1.0])  # padding leaves of the power-of-two array are not leaves


updates = st.lists(
    st.tuples(st.lists(st.integers(0, 12), min_size=0, max_size=6),
              st.floats(0.0, 1e6, allow_nan=False)),
    max_size=20)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 13), updates=updates)
def test_sums_stay_exact_under_random_updates(capacity, updates):
    tree, leaves = SumTree(capacity), np.zeros(capacity)
    for indices, value in updates:
        indices = [i % capacity for i in indices]
        values = value * (1 + np.arange(len(indices)))
        tree.update(np.array(indices, np.int64), values)
        for i, v in zip(indices, values):
            leaves[i] = v
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), leaves)
    assert np.isclose(tree.total, leaves.sum())
    assert tree.num_nonzero == np.count_nonzero(leaves)
    internal = np.arange(1, len(tree.tree) // 2)
    children_sums = tree.tree[2 * internal] + tree.tree[2 * internal + 1]
    np.testing.assert_array_equal(tree.tree[internal], children_sums)


def test_several_batches_are_each_stratified_over_the_whole_tree():
    values = np.random.default_rng(3).uniform(0.1, 5.0, 64)
    tree = SumTree(64)
    tree.update(np.arange(64), values)
    drawn = tree.sample(8, np.random.default_rng(0), batches=5)
    rng = np.random.default_rng(0)
    separate = np.concatenate([tree.sample(8, rng) for _ in range(5)])
    np.testing.assert_array_equal(drawn, separate)
    for block in drawn.reshape(5, 8):  # each spans the leaves, as one draw of 8 does
        assert block.min() < 16 and block.max() >= 48
