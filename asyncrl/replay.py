"""Replay of n-step transitions, kept as one ring of steps per env stream so that each observation
is stored once: the next observation of a step is the observation of the stream's next slot."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from asyncrl.shm import Arrays
from asyncrl.sumtree import SumTree


def write_steps(arrays: dict[str, np.ndarray], streams: np.ndarray, positions: np.ndarray,
                stream_capacity: int, fields: dict[str, np.ndarray]) -> None:
    """Write one step at ``positions`` of each of ``streams`` into a ring store's ``arrays`` (by
    name), and the position itself: the one copy of a step into a store, whether the loop
    inserts it or an actor's worker process writes it ahead of publication
    (:class:`~asyncrl.writers.StreamWriter`)."""
    cols = positions % stream_capacity
    for name, value in fields.items():
        arrays[name][streams, cols] = value
    arrays["positions"][streams, cols] = positions


def published_positions(positions: np.ndarray, head: np.ndarray) -> np.ndarray:
    """A copy of a ring store's slot positions with -1 where a worker process has written a
    step ahead of the published ``head``. ``positions`` is read once: a worker may write a slot
    between two reads of the live array (``np.where(positions >= head, -1, positions)`` read it
    twice, and a checkpoint then held steps past its head, which the resumed run overwrote)."""
    seen = positions.copy()
    seen[seen >= head[:, None]] = -1
    return seen


class Replay:
    """Preallocated rings of steps, one per stream (one env of one actor), sampled through a
    sum-tree: uniformly when ``priority_exponent`` is 0, by priority otherwise.

    A slot holds ``obs_t, action_t`` and what the env returned after the action: ``reward_t,
    terminated_t, truncated_t``. ``applied_t`` is False when the action was never applied: the
    step after an episode end (EnvPool's auto-reset ignores the action) holds the episode's final
    observation, and a slot whose successor will never come (see :meth:`cut`). Only applied slots
    start a transition, and no n-step return runs past an episode end or a cut.

    Slots are addressed by stream and *position*, the stream's unwrapped count of steps written
    before it; position p lives in column ``p % stream_capacity``.

    ``shared``: the arrays live in shared memory, where actors' worker processes write their
    steps up to ``writers_ahead`` positions ahead of each stream's published head; the loop
    then only :meth:`publish` es them (counters and sum-tree leaves). Those columns are kept
    out of sampling until written and published.
    """

    _ARRAYS = ("obs", "actions", "rewards", "terminated", "truncated", "applied", "positions",
               "head")
    _STEP_FIELDS = ("obs", "actions", "rewards", "terminated", "truncated", "applied")

    def __init__(
        self,
        capacity: int,
        num_streams: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype,
        action_shape: tuple[int, ...],
        action_dtype: np.dtype,
        n_step: int,
        gamma: float,
        priority_exponent: float = 0.0,
        priority_eps: float = 1e-6,
        seed: int | None = None,
        shared: bool = False,
        writers_ahead: int = 0,
    ):
        if num_streams < 1 or n_step < 1:
            raise ValueError(
                f"need num_streams >= 1 and n_step >= 1, got {num_streams} and {n_step}")
        per_stream = capacity // num_streams
        least = n_step + 2 + writers_ahead  # the columns writers may fill ahead are not sampled
        if per_stream < least:
            ahead = f" with actors writing {writers_ahead} steps ahead" if writers_ahead else ""
            raise ValueError(
                f"replay capacity {capacity} split over {num_streams} env streams leaves "
                f"{per_stream} slots per stream; {n_step}-step returns{ahead} need at least "
                f"{least}, so use a capacity of at least {num_streams * least}")
        if priority_exponent < 0 or priority_eps <= 0:
            raise ValueError(f"need priority_exponent >= 0 and priority_eps > 0, got "
                             f"{priority_exponent} and {priority_eps}")
        self.num_streams = num_streams
        self.stream_capacity = per_stream
        self.n_step = n_step
        self.gamma = gamma
        self.priority_exponent = priority_exponent
        self.priority_eps = priority_eps
        self.writers_ahead = writers_ahead
        slots = (num_streams, per_stream)
        # Zeros leave pages untouched until written: a large ring costs memory as it fills.
        self._arrays = arrays = Arrays(shared)
        self.obs = arrays.zeros("obs", slots + tuple(obs_shape), obs_dtype)
        self.actions = arrays.zeros("actions", slots + tuple(action_shape), action_dtype)
        self.rewards = arrays.zeros("rewards", slots, np.float32)
        self.terminated = arrays.zeros("terminated", slots, bool)
        self.truncated = arrays.zeros("truncated", slots, bool)
        self.applied = arrays.zeros("applied", slots, bool)
        self.positions = arrays.zeros("positions", slots, np.int64)  # tells a sampled key from a slot's new owner
        self.positions[...] = -1
        self.head = arrays.zeros("head", (num_streams,), np.int64)  # steps published per stream, unwrapped
        self.max_priority = 1.0  # what new transitions get, so each is likely sampled at least once
        # Prioritised: a sum-tree. Uniform: only which slots are sampleable, drawn by rejection
        # within each stream's filled columns (a tree's upkeep and descent cost ~10x more).
        self._tree = SumTree(num_streams * per_stream) if priority_exponent > 0 else None
        self._sampleable = np.zeros(num_streams * per_stream, bool)
        self._num_sampleable = 0
        self._rng = np.random.default_rng(seed)
        # Views (no copies) of the per-slot arrays with the stream and column axes merged, which
        # sampling indexes with one flat slot number; load_state_dict writes in place, so they stay.
        self._flat = {name: getattr(self, name).reshape(num_streams * per_stream,
                                                        *getattr(self, name).shape[2:])
                      for name in ("obs", "actions", "rewards", "terminated", "truncated",
                                   "applied", "positions")}
        self._offsets = np.arange(n_step + 1)
        self._discount_powers = gamma ** np.arange(n_step + 1, dtype=np.float64)

    @property
    def capacity(self) -> int:
        """Slots held when full: ``num_streams * (capacity // num_streams)``."""
        return self.num_streams * self.stream_capacity

    @property
    def size(self) -> int:
        return int(np.minimum(self.head, self.stream_capacity).sum())

    @property
    def fill(self) -> float:
        return self.size / self.capacity

    @property
    def prioritized(self) -> bool:
        return self._tree is not None

    @property
    def num_sampleable(self) -> int:
        return self._tree.num_nonzero if self._tree is not None else self._num_sampleable

    def _set_leaves(self, leaves: np.ndarray, values: np.ndarray) -> None:
        if self._tree is not None:
            self._tree.update(leaves, values)
            return
        # Leaves within one call are distinct (one slot per stream, or a slot and its n-th
        # predecessor), so counting before and after is exact.
        self._num_sampleable -= int(np.count_nonzero(self._sampleable[leaves]))
        self._sampleable[leaves] = values > 0
        self._num_sampleable += int(np.count_nonzero(self._sampleable[leaves]))

    def _draw(self, batch_size: int, batches: int) -> np.ndarray:
        """``batches`` independent draws of ``batch_size`` leaves, one after the other."""
        if self._tree is not None:
            return self._tree.sample(batch_size, self._rng, batches)
        # Uniform: independent draws, so every block of the result is a draw of its own.
        n = batch_size * batches
        filled = np.minimum(self.head, self.stream_capacity)
        ends = np.cumsum(filled)
        found: list[np.ndarray] = []
        missing = n
        while missing:
            # Most filled slots are sampleable (all but episode ends and each stream's newest
            # n_step), so a few extra draws nearly always suffice in one round.
            u = self._rng.integers(0, ends[-1], size=missing + missing // 4 + 8)
            streams = np.searchsorted(ends, u, side="right")
            leaves = streams * self.stream_capacity + (u - (ends[streams] - filled[streams]))
            leaves = leaves[self._sampleable[leaves]][:missing]
            found.append(leaves)
            missing -= len(leaves)
        return np.concatenate(found)

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """The shared-memory tensors behind the arrays, by name (for the worker processes that
        write into them; empty unless made ``shared``)."""
        return self._arrays.tensors()

    def insert(self, streams, obs, actions, rewards, terminated, truncated, applied) -> None:
        """Write one step at the head of each of ``streams`` (distinct) and publish it; the
        other arguments are batch-aligned with ``streams``."""
        streams = np.asarray(streams, np.int64)
        fields = dict(obs=obs, actions=actions, rewards=rewards, terminated=terminated,
                      truncated=truncated, applied=applied)
        write_steps(vars(self), streams, self.head[streams], self.stream_capacity, fields)
        self.publish(streams)

    def publish(self, streams) -> None:
        """Make the step written at the head of each of ``streams`` (distinct) part of the
        replay: one vectorised call for a batch, whoever wrote the steps."""
        streams = np.asarray(streams, np.int64)
        written = self.head[streams]
        self.head[streams] = written + 1
        # Out of sampling: the column a writer may fill next (the one just written, when the
        # writer is this call's caller). The new step needs n_step successors before it can be
        # sampled; the step n_step back has just got its last one (if the stream is that long).
        capacity = self.stream_capacity
        first = streams * capacity
        taken = first + (written + self.writers_ahead) % capacity
        ready = written - self.n_step
        if ready.min(initial=0) < 0:
            first, ready = first[ready >= 0], ready[ready >= 0]
        ready = first + ready % capacity
        applied = self._flat["applied"][ready]
        if self._tree is not None:
            self._tree.update(np.concatenate([taken, ready]), np.concatenate(
                [np.zeros(len(taken)), np.where(applied, self.max_priority ** self.priority_exponent, 0.0)]))
            return
        sampleable = self._sampleable  # the two sets of leaves are distinct (see __init__'s check)
        self._num_sampleable -= int(np.count_nonzero(sampleable[taken])) + int(np.count_nonzero(sampleable[ready]))
        sampleable[taken] = False
        sampleable[ready] = applied
        self._num_sampleable += int(np.count_nonzero(applied))

    def open_streams(self, streams) -> None:
        """Before a writer in another process takes ``streams`` over: :meth:`cut` them, and take
        the columns it may fill before its first step is published out of sampling."""
        streams = np.asarray(streams, np.int64)
        self.cut(streams)
        if self.writers_ahead:
            positions = self.head[streams, None] + np.arange(self.writers_ahead)
            cols = positions % self.stream_capacity
            leaves = self._leaf(np.broadcast_to(streams[:, None], cols.shape), cols).ravel()
            self._set_leaves(leaves, np.zeros(len(leaves)))

    def cut(self, streams) -> None:
        """Mark the last step of each stream as never applied: its successor will never be
        written (its env was reset, or a new adder took the stream over), so no n-step return
        may run past it. Its observation still ends the returns of the steps before it."""
        streams = np.asarray(streams, np.int64)
        streams = streams[self.head[streams] > 0]
        # Not yet sampleable (it has no successor), so its sum-tree leaf is already 0.
        self.applied[streams, (self.head[streams] - 1) % self.stream_capacity] = False

    def sample(self, batch_size: int, importance_exponent: float = 0.0,
               batches: int = 1) -> dict[str, np.ndarray]:
        """A batch of n-step transitions: ``obs, actions, rewards`` (discounted n-step return),
        ``discounts`` (on the bootstrap value: ``gamma**k`` after k steps, 0 when the episode
        terminated within them), ``next_obs``, ``weights`` (importance weights, max 1) and
        ``keys`` for :meth:`update_priorities` (``position * num_streams + stream``).

        ``batches`` > 1 draws that many batches in one call (their rows one after the other,
        importance weights normalised within each): each batch is drawn as one call would draw
        it, as if there were as many calls with no priority update between them, for one call's
        overhead."""
        if self.num_sampleable == 0:
            raise ValueError(
                f"nothing to sample yet: a step becomes sampleable once {self.n_step} more "
                f"steps of its stream are in replay ({self.size} steps held in "
                f"{self.num_streams} streams)")
        flat = self._flat  # the arrays as one row of slots each: one index per item, not two
        leaves = self._draw(batch_size, batches)
        returns = self.n_step_returns(leaves)
        weights = np.ones(batch_size * batches, np.float32)
        if self._tree is not None and importance_exponent > 0:
            # (N * P(i)) ** -beta over its batch maximum, in which the N sampleable slots cancel.
            w = (self._tree.get(leaves) ** -importance_exponent).reshape(batches, -1)
            weights = (w / w.max(axis=1, keepdims=True)).astype(np.float32).reshape(-1)
        return {"obs": flat["obs"][leaves], "actions": flat["actions"][leaves], "rewards": returns["rewards"],
                "discounts": returns["discounts"], "next_obs": flat["obs"][returns["next_leaves"]],
                "weights": weights, "keys": returns["keys"]}

    def n_step_returns(self, leaves: np.ndarray) -> dict[str, np.ndarray]:
        """The transitions that start at sampleable slots ``leaves`` (flat slot numbers), but
        their observations and actions: ``rewards`` and ``discounts`` as :meth:`sample` gives
        them, ``next_leaves`` (the slot of each ``next_obs``) and ``keys``."""
        n, per_stream, flat = self.n_step, self.stream_capacity, self._flat
        streams = leaves // per_stream
        starts = flat["positions"][leaves]
        # Slots of steps p .. p+n of each item's stream (its ring wraps within the stream).
        window = (streams * per_stream)[:, None] + (starts[:, None] + self._offsets) % per_stream
        steps, successors = window[:, :-1], window[:, 1:]
        # A return stops at an episode end or before a step whose action was never applied.
        stops = flat["terminated"][steps] | flat["truncated"][steps] | ~flat["applied"][successors]
        k = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, n)
        in_return = self._offsets[:-1] < k[:, None]
        rewards = (flat["rewards"][steps] * in_return) @ self._discount_powers[:-1]
        terminal = flat["terminated"][np.take_along_axis(steps, k[:, None] - 1, axis=1)[:, 0]]
        return {"rewards": rewards.astype(np.float32),
                "discounts": np.where(terminal, 0.0, self._discount_powers[k]).astype(np.float32),
                "next_leaves": np.take_along_axis(window, k[:, None], axis=1)[:, 0],  # slot of step p+k
                "keys": starts * self.num_streams + streams}

    def update_priorities(self, keys, priorities) -> None:
        """Set the priorities of sampled items; keys of slots overwritten since are ignored."""
        if self._tree is None:
            return
        positions, streams = np.divmod(np.asarray(keys, np.int64), self.num_streams)
        cols = positions % self.stream_capacity
        leaves = self._leaf(streams, cols)
        # A key goes stale when its slot is overwritten; and no key may make sampleable a slot
        # that is not.
        live = (self.positions[streams, cols] == positions) & (self._tree.get(leaves) > 0)
        priorities = np.abs(np.asarray(priorities, np.float64))[live] + self.priority_eps
        self._tree.update(leaves[live], priorities ** self.priority_exponent)
        if priorities.size:
            self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict[str, Any]:
        """The replay's contents: numpy arrays, ``max_priority`` (a float) and ``rng``, the
        sampling RNG's state (plain dict data, JSON-able), so a restored replay draws what this
        one would have drawn next. The large arrays are views, not copies (a full Atari replay
        is tens of GB): serialise the dict before inserting again."""
        state: dict[str, Any] = {name: getattr(self, name) for name in self._ARRAYS}
        if self.writers_ahead:  # slots written ahead of publication are not part of the replay yet
            state["positions"] = published_positions(self.positions, self.head)
        state["priorities"] = (self._tree.get(np.arange(self.capacity)) if self._tree is not None
                               else self._sampleable.astype(np.float64))
        state["max_priority"] = self.max_priority
        state["rng"] = self._rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {name: (getattr(self, name).shape, getattr(self, name).dtype)
                    for name in self._ARRAYS}
        expected["priorities"] = ((self.capacity,), np.dtype(np.float64))
        for name, (shape, dtype) in expected.items():
            theirs = np.asarray(state[name])
            if theirs.shape != shape or theirs.dtype != dtype:
                raise ValueError(
                    f"replay state '{name}' is {theirs.dtype}{list(theirs.shape)} but this replay "
                    f"holds {dtype}{list(shape)}: it was saved with another capacity, number of "
                    f"env streams or env")
        for name in self._ARRAYS:
            getattr(self, name)[...] = state[name]
        # Parents are always the sum of their children, so rebuilding from the leaves gives back
        # the same tree, bit for bit.
        if self._tree is not None:
            self._tree = SumTree(self.capacity)
            self._tree.update(np.arange(self.capacity), state["priorities"])
        else:
            self._sampleable[:] = state["priorities"] > 0
            self._num_sampleable = int(np.count_nonzero(self._sampleable))
        self.max_priority = float(state["max_priority"])
        self._rng.bit_generator.state = state["rng"]

    def _leaf(self, streams: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return streams * self.stream_capacity + cols
