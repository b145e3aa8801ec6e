"""Sequence replay for recurrent learners: each env's steps stored once, sampled as overlapping
fixed-length windows that start every ``period`` steps of an episode, with the actor state at
their start.

Data flow: actor (carrying each env's recurrent state) -> :class:`SequenceAdder` (one step per
env per batch, with the state the acting network had at it) -> :class:`SequenceReplay` (rings of
steps per env stream; a sum-tree over sequence starts) -> learner -> ``algo.update``.

Memory: an observation is stored once however many sequences it belongs to (``length / period``
of them), so frames cost what they cost in the n-step replay; the sampled batch is the only copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncrl.acting import Acted
from asyncrl.adders import NStepAdder
from asyncrl.core import StateSpec
from asyncrl.replay import published_positions, write_steps
from asyncrl.shm import Arrays
from asyncrl.sumtree import SumTree


class SequenceReplay:
    """Rings of steps, one per stream (one env of one actor), and a sum-tree whose leaves are the
    sequence starts: uniform sampling when ``priority_exponent`` is 0, by priority otherwise.

    A slot holds ``obs_t``, ``action_t``, the actor state at ``obs_t``, what the env returned after
    the action (``reward_t, terminated_t, truncated_t``) and ``applied_t`` (False for an episode's
    final observation, whose action EnvPool's reset step ignores, and for a slot whose successor
    never came, see :meth:`cut`). ``episode_steps`` counts each slot's steps since its episode
    began; a sequence starts at every slot where that count is a multiple of ``period``.

    A sequence becomes sampleable once complete: its ``length`` slots are written, or its episode
    ended within them (the rows after the final observation are then zero-padded and masked out).
    A sequence leaves the tree ``length - 1`` slots before its first slot is overwritten, so no
    sampled window ever holds a newer step.

    Keys (for :meth:`update_priorities`) are ``start_position * num_streams + stream``, where a
    position is the stream's unwrapped count of steps written before the slot.

    ``shared`` and ``writers_ahead`` as for :class:`~asyncrl.replay.Replay` (at most
    ``length - 1``: a sequence leaves the tree that long before its slots are overwritten).
    """

    _ARRAYS = ("obs", "actions", "rewards", "terminated", "truncated", "applied", "positions",
               "episode_steps", "head", "next_episode_step")

    def __init__(self, capacity: int, num_streams: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                 action_shape: tuple[int, ...], action_dtype: np.dtype, length: int, period: int,
                 state_spec: StateSpec | None = None, priority_exponent: float = 0.0,
                 priority_eps: float = 1e-6, seed: int | None = None, shared: bool = False,
                 writers_ahead: int = 0):
        if num_streams < 1 or length < 2 or not 1 <= period <= length:
            raise ValueError(f"need num_streams >= 1, length >= 2 and 1 <= period <= length, got "
                             f"{num_streams}, {length} and {period}")
        per_stream = capacity // num_streams
        if per_stream < 2 * length:
            raise ValueError(
                f"replay capacity {capacity} split over {num_streams} env streams leaves {per_stream} "
                f"steps per stream; sequences of {length} need at least {2 * length}, so use a "
                f"capacity of at least {2 * length * num_streams}")
        if priority_exponent < 0 or priority_eps <= 0:
            raise ValueError(f"need priority_exponent >= 0 and priority_eps > 0, got "
                             f"{priority_exponent} and {priority_eps}")
        if writers_ahead >= length:
            raise ValueError(f"sequences of {length} steps allow writers at most {length - 1} "
                             f"steps ahead, not {writers_ahead}")
        self.num_streams, self.stream_capacity = num_streams, per_stream
        self.writers_ahead = writers_ahead
        self.length, self.period = length, period
        self.priority_exponent, self.priority_eps = priority_exponent, priority_eps
        slots = (num_streams, per_stream)
        self._arrays = arrays = Arrays(shared)  # pages committed as written
        self.obs = arrays.zeros("obs", slots + tuple(obs_shape), obs_dtype)
        self.actions = arrays.zeros("actions", slots + tuple(action_shape), action_dtype)
        self.rewards = arrays.zeros("rewards", slots, np.float32)
        self.terminated = arrays.zeros("terminated", slots, bool)
        self.truncated = arrays.zeros("truncated", slots, bool)
        self.applied = arrays.zeros("applied", slots, bool)
        self.positions = arrays.zeros("positions", slots, np.int64)
        self.positions[...] = -1
        self.episode_steps = np.zeros(slots, np.int64)
        self.head = arrays.zeros("head", (num_streams,), np.int64)
        self.next_episode_step = np.zeros(num_streams, np.int64)
        self.states = {name: arrays.zeros(f"state/{name}", slots + tuple(shape), dtype)
                       for name, (shape, dtype) in (state_spec or {}).items()}
        self.max_priority = 1.0
        self._tree = SumTree(num_streams * per_stream)
        self._rng = np.random.default_rng(seed)

    @property
    def capacity(self) -> int:
        return self.num_streams * self.stream_capacity

    @property
    def size(self) -> int:
        """Steps held."""
        return int(np.minimum(self.head, self.stream_capacity).sum())

    @property
    def fill(self) -> float:
        return self.size / self.capacity

    @property
    def prioritized(self) -> bool:
        return self.priority_exponent > 0

    @property
    def num_sampleable(self) -> int:
        """Complete sequences that may be drawn."""
        return self._tree.num_nonzero

    def shared_tensors(self) -> dict:
        """As :meth:`Replay.shared_tensors <asyncrl.replay.Replay.shared_tensors>`; the actor
        states as ``state/<name>``."""
        return self._arrays.tensors()

    def insert(self, streams, obs, actions, rewards, terminated, truncated, applied,
               state: dict[str, np.ndarray] | None = None) -> None:
        """Write one step at the head of each of ``streams`` (distinct) and publish it; the
        other arguments, ``state``'s arrays included, are batch-aligned with ``streams``."""
        streams = np.asarray(streams, np.int64)
        fields = dict(obs=obs, actions=actions, rewards=rewards, terminated=terminated,
                      truncated=truncated, applied=applied)
        fields.update({f"state/{name}": 0 if state is None else state[name] for name in self.states})
        arrays = {**vars(self), **{f"state/{name}": a for name, a in self.states.items()}}
        write_steps(arrays, streams, self.head[streams], self.stream_capacity, fields)
        self.publish(streams)

    def publish(self, streams) -> None:
        """Make the step written at the head of each of ``streams`` (distinct) part of the
        replay, opening the sequences it completes: one vectorised call for a batch (and a
        short loop over the episodes that ended in it), whoever wrote the steps."""
        streams = np.asarray(streams, np.int64)
        written = self.head[streams]
        cols = written % self.stream_capacity
        applied = self.applied[streams, cols]
        es = self.next_episode_step[streams]
        self.episode_steps[streams, cols] = es
        self.next_episode_step[streams] = np.where(applied, es + 1, 0)
        self.head[streams] = written + 1
        length = self.length
        # Out of the tree: the slot just written, and the sequence whose window would reach the
        # slot to be overwritten length - 1 inserts from now (writers write at most that far ahead).
        stale = np.concatenate([self._leaf(streams, cols),
                                self._leaf(streams, (written + length - 1) % self.stream_capacity)])
        # In: the sequence that ends at this slot, and where this slot ends its episode, every
        # shorter one of the episode that began within the last length - 1 slots (zero-padded).
        full = (es >= length - 1) & ((es - length + 1) % self.period == 0)
        starts = [written[full] - length + 1]
        owners = [streams[full]]
        for stream, position, step in zip(streams[~applied], written[~applied], es[~applied]):
            p = self._ended_starts(position, step)
            starts.append(p)
            owners.append(np.full(len(p), stream))
        self._open(stale, np.concatenate(owners), np.concatenate(starts))

    def open_streams(self, streams) -> None:
        """Before a writer in another process takes ``streams`` over: :meth:`cut` them (the
        sequences its writes could reach are out of the tree already)."""
        self.cut(streams)

    def cut(self, streams) -> None:
        """End each stream's last step: its successor will never be written (its env was reset,
        or a new adder took the stream over). Sequences that reach it end there, padded."""
        streams = np.asarray(streams, np.int64)
        streams = streams[self.head[streams] > 0]
        positions = self.head[streams] - 1
        cols = positions % self.stream_capacity
        self.applied[streams, cols] = False
        self.next_episode_step[streams] = 0
        starts, owners = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for stream, position, step in zip(streams, positions, self.episode_steps[streams, cols]):
            p = self._ended_starts(position, step)
            starts.append(p)
            owners.append(np.full(len(p), stream))
        self._open(np.zeros(0, np.int64), np.concatenate(owners), np.concatenate(starts))

    def _ended_starts(self, position: int, step: int) -> np.ndarray:
        """Sequence starts of an episode whose final observation sits at ``position`` (its
        ``step``-th), that end before a full window: those within the last ``length - 2``."""
        first = max(step - self.length + 2, 0)
        first += -first % self.period
        return position - step + np.arange(first, step, self.period, dtype=np.int64)

    def _open(self, stale: np.ndarray, streams: np.ndarray, starts: np.ndarray) -> None:
        cols = starts % self.stream_capacity
        value = self.max_priority ** self.priority_exponent
        self._tree.update(np.concatenate([stale, self._leaf(streams, cols)]),
                          np.concatenate([np.zeros(len(stale)), np.full(len(starts), value)]))

    def sample(self, batch_size: int, importance_exponent: float = 0.0,
               batches: int = 1) -> dict[str, Any]:
        """``batch_size * batches`` sequences, batch first (``[N, length, ...]``): ``obs, actions,
        rewards, terminated, truncated, applied, valid`` (see :class:`~asyncrl.core.SequenceBatch`;
        rows outside the episode are zeros, and so is all but the observation of its final row),
        ``state`` (name -> ``[N, ...]``: the actor state at each first row), ``weights``
        (importance weights, max 1 within each batch) and ``keys``. The ``batches`` batches come
        one after the other, each drawn as a call of its own would draw it."""
        if self.num_sampleable == 0:
            raise ValueError(
                f"nothing to sample yet: a sequence is sampleable once its {self.length} steps are in "
                f"replay or its episode ended ({self.size} steps held in {self.num_streams} streams)")
        total = batch_size * batches
        leaves = self._tree.sample(batch_size, self._rng, batches)
        streams, cols = np.divmod(leaves, self.stream_capacity)
        starts = self.positions[streams, cols]
        offsets = np.arange(self.length)
        window = (starts[:, None] + offsets) % self.stream_capacity
        rows = streams[:, None]
        applied = self.applied[rows, window]
        # In the episode: written in order from the start, up to and with its first unapplied row.
        valid = ((self.positions[rows, window] == starts[:, None] + offsets)
                 & (self.episode_steps[rows, window] == self.episode_steps[streams, cols][:, None] + offsets))
        valid[:, 1:] &= np.cumprod(applied[:, :-1], axis=1, dtype=bool)
        valid = np.cumprod(valid, axis=1, dtype=bool)

        applied &= valid

        def gather(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
            out = array[rows, window]
            out[~keep] = 0
            return out

        weights = np.ones(total, np.float32)
        if self.prioritized and importance_exponent > 0:
            w = (self._tree.get(leaves) ** -importance_exponent).reshape(batches, -1)
            weights = (w / w.max(axis=1, keepdims=True)).astype(np.float32).reshape(-1)
        return {
            # An episode's final observation is there to bootstrap from; the rest of its row is
            # EnvPool's reset step, no transition: zeros like the padding.
            "obs": gather(self.obs, valid), "actions": gather(self.actions, applied),
            "rewards": gather(self.rewards, applied), "terminated": gather(self.terminated, applied),
            "truncated": gather(self.truncated, applied), "applied": applied, "valid": valid,
            "state": {name: array[streams, cols] for name, array in self.states.items()},
            "weights": weights, "keys": starts * self.num_streams + streams,
        }

    def update_priorities(self, keys, priorities) -> None:
        """Set the priorities of sampled sequences; keys of sequences gone since are ignored."""
        if not self.prioritized:
            return
        positions, streams = np.divmod(np.asarray(keys, np.int64), self.num_streams)
        cols = positions % self.stream_capacity
        leaves = self._leaf(streams, cols)
        live = (self.positions[streams, cols] == positions) & (self._tree.get(leaves) > 0)
        priorities = np.abs(np.asarray(priorities, np.float64))[live] + self.priority_eps
        self._tree.update(leaves[live], priorities ** self.priority_exponent)
        if priorities.size:
            self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict[str, Any]:
        """The replay's contents (views, not copies: serialise before inserting again), with
        ``max_priority`` and the sampling RNG's state ``rng`` as plain data, as
        :meth:`Replay.state_dict <asyncrl.replay.Replay.state_dict>` has them."""
        state: dict[str, Any] = {name: getattr(self, name) for name in self._ARRAYS}
        if self.writers_ahead:  # slots written ahead of publication are not part of the replay yet
            state["positions"] = published_positions(self.positions, self.head)
        state.update({f"state/{name}": array for name, array in self.states.items()})
        state["priorities"] = self._tree.get(np.arange(self.capacity))
        state["max_priority"] = self.max_priority
        state["rng"] = self._rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {**{name: getattr(self, name) for name in self._ARRAYS},
                **{f"state/{name}": array for name, array in self.states.items()},
                "priorities": np.zeros(self.capacity)}  # checked here, loaded into the tree below
        for name, array in mine.items():
            theirs = np.asarray(state[name])
            if theirs.shape != array.shape or theirs.dtype != array.dtype:
                raise ValueError(
                    f"replay state '{name}' is {theirs.dtype}{list(theirs.shape)} but this replay "
                    f"holds {array.dtype}{list(array.shape)}: it was saved with another capacity, "
                    f"number of env streams, env or network")
        for name, array in mine.items():
            array[...] = state[name]
        self._tree = SumTree(self.capacity)
        self._tree.update(np.arange(self.capacity), state["priorities"])
        self.max_priority = float(state["max_priority"])
        self._rng.bit_generator.state = state["rng"]

    def _leaf(self, streams: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return streams * self.stream_capacity + cols


class SequenceAdder(NStepAdder):
    """:class:`~asyncrl.adders.NStepAdder`'s step stream, with each step's actor state: the
    state the acting network had when it chose the step's action, passed to
    :meth:`record_actions` beside the actions."""

    def __init__(self, replay: SequenceReplay, streams_offset: int, num_envs: int,
                 obs_shape: tuple[int, ...], obs_dtype: np.dtype, action_shape: tuple[int, ...],
                 action_dtype: np.dtype, state_spec: StateSpec):
        super().__init__(replay, streams_offset, num_envs, obs_shape, obs_dtype, action_shape,
                         action_dtype)
        self._prev_state = {name: np.zeros((num_envs, *shape), dtype)
                            for name, (shape, dtype) in state_spec.items()}

    def _insert_extras(self, ids: np.ndarray) -> dict[str, Any]:
        return {"state": {name: array[ids] for name, array in self._prev_state.items()}}

    def record_actions(self, env_ids, acted: Acted) -> None:
        """The actions sent for these envs' latest observations, and the actor state at them."""
        if not acted.state and self._prev_state:
            raise RuntimeError("record_actions() without the actor state: a sequence replay "
                               "stores it with every step")
        super().record_actions(env_ids, acted)
        ids = np.asarray(env_ids, np.int64)
        for name, array in self._prev_state.items():
            array[ids] = acted.state[name]
