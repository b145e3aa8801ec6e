"""Where a process actor's steps go: straight into the run's store, in shared memory.

The worker process runs the adder an inline actor runs (one writer per data kind), over a
stand-in for the store: :class:`StreamWriter` for the replays' stream rings (transitions,
sequences) writes each step at the worker's own head of its streams, ahead of publication;
:class:`TrajectorySink` for the rollout queue collects the trajectories a batch finishes in a
slot of the actor's own shared memory. The loop's half of the same object, :meth:`publish`,
makes a batch's items part of the store once the gate (rate limiter or queue) admits them: one
vectorised call per batch, nothing per item.

Per batch, in the worker: :meth:`begin` (a free slot), the adder's ``observe`` and
``record_actions``, :meth:`finish` (how many items the slot holds, for the loop's gate).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from asyncrl.replay import Replay, write_steps
from asyncrl.rollout import RolloutQueue
from asyncrl.sequence import SequenceReplay
from asyncrl.shm import shared_zeros


class _Halves:
    """Pickled to the worker without the loop's store; numpy views made on :meth:`attach`."""

    store: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("store", "_views", "_published")}

    def _numpy(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in tensors.items()}


class StreamWriter(_Halves):
    """A worker's stand-in for a ring store (:class:`~asyncrl.replay.Replay`,
    :class:`~asyncrl.sequence.SequenceReplay`): the adder's inserts land in the store's shared
    arrays at the worker's own head of each stream, at most ``slots`` batches ahead of what
    the loop published (the store was made with ``writers_ahead = slots``, keeping those
    columns out of sampling). Its streams are cut by the loop (``store.open_streams``) before
    the worker writes, so :meth:`cut` does nothing here."""

    def __init__(self, store: Replay | SequenceReplay, slots: int, batch: int):
        if not store.shared_tensors():
            raise ValueError("a store written by worker processes must be made with shared=True")
        if store.writers_ahead < slots:
            raise ValueError(f"the store lets writers run {store.writers_ahead} steps ahead, "
                             f"the worker has {slots} slots")
        self.store = store
        self.num_streams, self.stream_capacity = store.num_streams, store.stream_capacity
        self._tensors = store.shared_tensors()
        self._written_per_slot = shared_zeros((slots, batch), np.dtype(np.int64))
        self._views: dict[str, np.ndarray] | None = None
        self._published = self._written_per_slot.numpy()  # the loop's view of the slots

    def attach(self) -> None:
        """In the worker, once the loop's store holds what it resumes from: start writing at
        each stream's published head."""
        self._views = self._numpy(self._tensors)
        self._heads = self._views["head"].copy()
        self._states = [name for name in self._views if name.startswith("state/")]
        self._slots = self._written_per_slot.numpy()
        self._written: list[np.ndarray] = []
        self._slot = -1

    def begin(self, slot: int) -> None:
        self._slot = slot

    def insert(self, streams, obs, actions, rewards, terminated, truncated, applied,
               state: dict[str, np.ndarray] | None = None) -> None:
        streams = np.asarray(streams, np.int64)
        fields = dict(obs=obs, actions=actions, rewards=rewards, terminated=terminated,
                      truncated=truncated, applied=applied)
        fields.update({name: 0 if state is None else state[name[6:]] for name in self._states})
        write_steps(self._views, streams, self._heads[streams], self.stream_capacity, fields)
        self._heads[streams] += 1
        self._written.append(streams)

    def cut(self, streams) -> None:
        pass  # done by the loop before this writer's first step (store.open_streams)

    def finish(self) -> int:
        """The streams written since :meth:`begin` go in its slot; returns how many."""
        written = np.concatenate(self._written) if self._written else np.zeros(0, np.int64)
        self._written.clear()
        self._slots[self._slot, :len(written)] = written
        return len(written)

    # --- the loop's half ---

    def open(self, streams: np.ndarray) -> None:
        """Before the worker starts: the streams it takes over (see the class docstring)."""
        self.store.open_streams(streams)

    def publish(self, slot: int, count: int) -> None:
        self.store.publish(self._published[slot, :count])


class TrajectorySink(_Halves):
    """A worker's stand-in for the :class:`~asyncrl.rollout.RolloutQueue`: the trajectories
    the adder finishes in a batch (at most one per env of the batch) go into the batch's slot,
    from which the loop puts them into the queue in one copy per field."""

    def __init__(self, queue: RolloutQueue, slots: int, batch: int):
        self.store = queue
        self.length = queue.length
        self._tensors = {name: shared_zeros((slots, batch, *shape), dtype)
                         for name, (shape, dtype) in queue.layout().items()}
        self._views: dict[str, np.ndarray] | None = None
        self._published = self._numpy(self._tensors)  # the loop's view of the slots

    def attach(self) -> None:
        self._views = self._numpy(self._tensors)
        self._slot, self._count = -1, 0

    def begin(self, slot: int) -> None:
        self._slot, self._count = slot, 0

    def put(self, fields: dict[str, np.ndarray], extras: dict[str, np.ndarray]) -> None:
        n, at = len(fields["weight_version"]), slice(self._count, self._count + len(fields["weight_version"]))
        for name, value in fields.items():
            self._views[name][self._slot, at] = value
        for name, value in extras.items():
            self._views[f"extras/{name}"][self._slot, at] = value
        self._count += n

    def finish(self) -> int:
        return self._count

    # --- the loop's half ---

    def open(self, streams: np.ndarray) -> None:
        pass  # a trajectory starts afresh with every worker (its adder's own state)

    def publish(self, slot: int, count: int) -> None:
        views = self._published
        fields = {name: v[slot, :count] for name, v in views.items() if not name.startswith("extras/")}
        extras = {name[7:]: v[slot, :count] for name, v in views.items() if name.startswith("extras/")}
        self.store.put(fields, extras)


def writer_for(store: Any, slots: int, batch: int) -> StreamWriter | TrajectorySink:
    """The worker-side writer of a store, by kind."""
    if isinstance(store, RolloutQueue):
        return TrajectorySink(store, slots, batch)
    return StreamWriter(store, slots, batch)
