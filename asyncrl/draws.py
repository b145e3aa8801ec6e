"""The learner's draws: what a batch is made of, per kind of store. A draw takes ``count``
batches in one go (the fixed cost of a draw, paid once per chunk), moves them to the learner's
device (:mod:`asyncrl.staging`) and hands back each batch with its keys, whose priorities go back
to the store: :class:`ReplayDraw` from a replay of transitions or sequences, :class:`MixedDraw`
with demonstrations mixed in, :class:`QueueDraw` from a rollout queue. A plan
(:mod:`asyncrl.plans`) makes its draw; :class:`asyncrl.learner.Learner` calls it."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from asyncrl.core import SequenceBatch, TrajectoryBatch, TransitionBatch
from asyncrl.metrics import PhaseTimer
from asyncrl.replay import Replay
from asyncrl.sequence import SequenceReplay
from asyncrl.staging import Staging
from asyncrl.weights import WeightStore

_FIELDS = ("obs", "actions", "rewards", "discounts", "next_obs", "weights")
_SEQUENCE_FIELDS = ("obs", "actions", "rewards", "terminated", "truncated", "applied", "valid")


class ReplayDraw:
    """The learner's draw from a replay of transitions or sequences: ``count`` batches in one
    replay call (each distributed as a draw of its own), moved to the device in one copy per
    field (on CUDA through pinned staging buffers; on the CPU no copy at all), with their keys,
    whose priorities go back to the replay."""

    def __init__(self, replay: Replay | SequenceReplay, batch_size: int,
                 importance_exponent: Callable[[], float], staging: Staging, timer: PhaseTimer):
        self.replay, self.batch_size, self.staging, self.timer = replay, batch_size, staging, timer
        self.importance_exponent = importance_exponent
        self.prioritized = replay.prioritized
        self._sequences = isinstance(replay, SequenceReplay)

    def __call__(self, count: int) -> list[tuple[TransitionBatch | SequenceBatch, np.ndarray]]:
        t0 = time.perf_counter()
        data = self.replay.sample(self.batch_size, self.importance_exponent(), batches=count)
        t1 = time.perf_counter()
        sequences = self._sequences
        arrays = {name: data[name] for name in (_SEQUENCE_FIELDS + ("weights",) if sequences else _FIELDS)}
        if sequences:
            arrays.update({("state", name): array for name, array in data["state"].items()})
        moved = self.staging.move(arrays)

        def split(key) -> tuple[torch.Tensor, ...]:
            tensor = moved[key]
            if count == 1:  # the whole draw: unbinding one batch off a view costs ~4 us a field
                return (tensor,)
            return tensor.view(count, self.batch_size, *tensor.shape[1:]).unbind(0)

        keys = data["keys"].reshape(count, -1)  # rows: np.split costs ~50 us more
        if sequences:  # sampled batch first, handed over time first
            fields = {name: [t.transpose(0, 1) for t in split(name)] for name in _SEQUENCE_FIELDS}
            states = {name: split(("state", name)) for name in data["state"]}
            weights = split("weights")
            batches: list = [SequenceBatch(**{name: fields[name][i] for name in _SEQUENCE_FIELDS},
                                           state={name: s[i] for name, s in states.items()},
                                           weights=weights[i]) for i in range(count)]
        else:
            fields = {name: split(name) for name in _FIELDS}
            batches = [TransitionBatch(**{name: fields[name][i] for name in _FIELDS})
                       for i in range(count)]
        self.timer.add("sample", t1 - t0)
        self.timer.add("h2d", time.perf_counter() - t1)
        return list(zip(batches, keys))

    def write_back(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.replay.update_priorities(keys, priorities)

    def metrics(self) -> dict[str, float]:
        return {}


class MixedDraw:
    """Demonstrations in replay (DQfD, R2D3): each batch is ``online.batch_size`` items of the
    online replay's draw followed by ``demo.batch_size`` of a demonstration replay's, field by
    field. Each part is drawn as its own draw would draw it (importance weights normalised within
    each part); the keys are the two parts' apart, so each priority goes back to the replay its
    item came from: the online replay's tree never sees a demonstration's key."""

    def __init__(self, online: ReplayDraw, demo: ReplayDraw):
        self.online, self.demo = online, demo
        self.batch_size = online.batch_size + demo.batch_size
        self.prioritized = online.prioritized

    def __call__(self, count: int) -> list[tuple[TransitionBatch | SequenceBatch, tuple[np.ndarray, np.ndarray]]]:
        drawn = []
        for (online, online_keys), (demo, demo_keys) in zip(self.online(count), self.demo(count)):
            t0 = time.perf_counter()
            drawn.append((_joined(online, demo), (online_keys, demo_keys)))
            self.online.timer.add("h2d", time.perf_counter() - t0)
        return drawn

    def write_back(self, keys: tuple[np.ndarray, np.ndarray], priorities: np.ndarray) -> None:
        online_keys, demo_keys = keys
        self.online.write_back(online_keys, priorities[:len(online_keys)])
        self.demo.write_back(demo_keys, priorities[len(online_keys):])

    def metrics(self) -> dict[str, float]:
        return {}


def _joined(a: TransitionBatch | SequenceBatch, b: TransitionBatch | SequenceBatch) -> TransitionBatch | SequenceBatch:
    """One batch of ``a``'s items then ``b``'s: transitions batch first, sequences time first
    (their actor states and weights batch first)."""
    if isinstance(a, TransitionBatch):
        return TransitionBatch(**{name: torch.cat((getattr(a, name), getattr(b, name))) for name in _FIELDS})
    return SequenceBatch(**{name: torch.cat((getattr(a, name), getattr(b, name)), dim=1) for name in _SEQUENCE_FIELDS},
                         state={name: torch.cat((a.state[name], b.state[name])) for name in a.state},
                         weights=torch.cat((a.weights, b.weights)))


class QueueDraw:
    """The learner's draw from a rollout queue: ``count`` batches of ``batch_size`` trajectories,
    each taken once, and how far behind the learner's weights they were acted (``policy_lag``)."""

    prioritized = False

    def __init__(self, queue: Any, batch_size: int, store: WeightStore, staging: Staging, timer: PhaseTimer):
        self.queue, self.batch_size, self.store, self.staging = queue, batch_size, store, staging
        self.timer = timer
        self.policy_lag = 0.0  # learner version minus the batch's, averaged over its trajectories

    def __call__(self, count: int) -> list[tuple[TrajectoryBatch, None]]:
        drawn = []
        for _ in range(count):
            t0 = time.perf_counter()
            fields, extras = self.queue.take(self.batch_size)
            t1 = time.perf_counter()
            moved = self.staging.move({**fields, **{("extras", k): v for k, v in extras.items()}})
            self.timer.add("sample", t1 - t0)
            self.timer.add("h2d", time.perf_counter() - t1)
            drawn.append((TrajectoryBatch(**{k: moved[k] for k in fields},
                                          extras={k: moved["extras", k] for k in extras}), None))
            self.policy_lag = float(self.store.version - fields["weight_version"].mean())
        return drawn

    def write_back(self, keys: None, priorities: np.ndarray) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"policy_lag": self.policy_lag}
