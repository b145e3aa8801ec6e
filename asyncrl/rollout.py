"""On-policy data: the trajectory adder, the FIFO rollout queue and the
actor that waits for fresh weights (PPO's policy lag 0).

Data flow: actor -> :class:`TrajectoryAdder` (cuts length-T trajectories per env, with the
behaviour policy's extras and weight version) -> :class:`RolloutQueue` (bounded FIFO; producers
wait while it is full; each trajectory is taken exactly once) -> the learner (through
:class:`asyncrl.draws.QueueDraw`: takes B trajectories, ``algo.update``, publishes) -> weight
store -> actors.

The queue stands where the off-policy path has the replay *and* its rate limiter: it offers the
limiter's ``await_insert`` / ``await_sample`` / ``try_*`` / ``stop`` surface, so actors and the
trainer's loops drive it unchanged.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from asyncrl.acting import Acted
from asyncrl.actor import Actor
from asyncrl.envs import Step
from asyncrl.ratelimit import LimiterStopped, _Waiters

Extras = dict[str, tuple[tuple[int, ...], np.dtype]]


class RolloutQueue:
    """A bounded FIFO of trajectories with Reverb's Queue semantics, in preallocated numpy arrays.

    Producers reserve room with :meth:`await_insert` (waiting while the queue is full) and then
    :meth:`put` that many trajectories; the consumer claims ``n`` with :meth:`await_sample` and
    :meth:`take` s the ``n`` oldest, which frees their slots. :meth:`stop` makes every waiter (and
    every later ``await_*``) raise :class:`LimiterStopped`. One event loop, no locks.
    """

    def __init__(self, capacity: int, length: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                 action_shape: tuple[int, ...], action_dtype: np.dtype, extras: Extras):
        if capacity < 1 or length < 1:
            raise ValueError(f"capacity and length must be >= 1, got {capacity} and {length}")
        self.capacity, self.length = capacity, length
        c, t = capacity, length
        self._fields: dict[str, np.ndarray] = {
            "obs": np.zeros((c, t + 1, *obs_shape), obs_dtype),
            "actions": np.zeros((c, t, *action_shape), action_dtype),
            "rewards": np.zeros((c, t), np.float32),
            "terminated": np.zeros((c, t), bool),
            "truncated": np.zeros((c, t), bool),
            "applied": np.zeros((c, t), bool),
            "weight_version": np.zeros(c, np.int64),
        }
        self._extras = {name: np.zeros((c, t, *shape), dtype) for name, (shape, dtype) in extras.items()}
        self._head = 0  # the oldest item's slot
        self._count = 0  # items stored
        self._reserved = 0  # slots producers reserved and have not filled yet
        self._claimed = 0  # stored items the consumer claimed and has not taken yet
        self.inserts = 0
        self.samples = 0
        self._stopped = False
        self._producers = _Waiters()
        self._consumers = _Waiters()

    # --- state ----------------------------------------------------------------------------------

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """One trajectory's fields (shape and dtype), the extras as ``extras/<name>``: what
        :meth:`put` takes."""
        arrays = {**self._fields, **{f"extras/{k}": v for k, v in self._extras.items()}}
        return {name: (array.shape[1:], array.dtype) for name, array in arrays.items()}

    @property
    def size(self) -> int:
        return self._count

    @property
    def fill(self) -> float:
        return self._count / self.capacity

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stats(self) -> dict[str, float]:
        return {"inserts": self.inserts, "samples": self.samples,
                "insert_wait_s": self._producers.wait_s, "sample_wait_s": self._consumers.wait_s,
                "insert_waits": self._producers.waits, "sample_waits": self._consumers.waits}

    # --- producers ------------------------------------------------------------------------------

    def can_insert(self, n: int) -> bool:
        return self._count + self._reserved + n <= self.capacity

    def try_insert(self, n: int) -> bool:
        """Reserve room for ``n`` trajectories if there is some now; never waits."""
        self._check(n)
        if not self.can_insert(n):
            return False
        self._reserved += n
        return True

    async def await_insert(self, n: int) -> None:
        """Wait until ``n`` trajectories fit, then reserve their room."""
        self._check(n)
        await self._producers.wait_until(lambda: self.can_insert(n), self)
        self._reserved += n

    def put(self, fields: dict[str, np.ndarray], extras: dict[str, np.ndarray]) -> None:
        """Append ``n`` trajectories (leading axis n of every field) into reserved room."""
        n = len(fields["weight_version"])
        if n > self._reserved:
            raise RuntimeError(f"put() of {n} trajectories with room for {self._reserved} reserved: "
                               "await_insert() or try_insert() first")
        slots = (self._head + self._count + np.arange(n)) % self.capacity
        for name, array in self._fields.items():
            array[slots] = fields[name]
        for name, array in self._extras.items():
            array[slots] = extras[name]
        self._reserved -= n
        self._count += n
        self.inserts += n
        self._consumers.wake()

    # --- the consumer ---------------------------------------------------------------------------

    def can_sample(self, n: int) -> bool:
        return self._count - self._claimed >= n

    def try_sample(self, n: int) -> bool:
        """Claim the next ``n`` trajectories if they are there now; never waits."""
        self._check(n)
        if not self.can_sample(n):
            return False
        self._claimed += n
        return True

    async def await_sample(self, n: int) -> None:
        """Wait until ``n`` unclaimed trajectories are stored, then claim them."""
        self._check(n)
        if n > self.capacity:
            raise ValueError(f"cannot wait for {n} trajectories in a queue of {self.capacity}")
        await self._consumers.wait_until(lambda: self.can_sample(n), self)
        self._claimed += n

    def take(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The ``n`` oldest (claimed) trajectories, time first (``[T(+1), n, ...]``), removed."""
        if n > self._claimed:
            raise RuntimeError(f"take({n}) with {self._claimed} claimed: await_sample() first")
        slots = (self._head + np.arange(n)) % self.capacity
        fields = {name: _time_first(array[slots]) for name, array in self._fields.items()}
        extras = {name: _time_first(array[slots]) for name, array in self._extras.items()}
        self._head = (self._head + n) % self.capacity
        self._count -= n
        self._claimed -= n
        self.samples += n
        self._producers.wake()
        return fields, extras

    def stop(self) -> None:
        self._stopped = True
        self._producers.wake()
        self._consumers.wake()

    def _check(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > self.capacity:
            raise ValueError(f"{n} trajectories can never fit a queue of {self.capacity}")


def min_queue_capacity(batch_size: int, max_put: int) -> int:
    """The smallest queue that cannot wedge when producers put up to ``max_put`` trajectories at
    a time and the consumer takes ``batch_size``: while fewer than ``batch_size`` are stored (the
    consumer waits), ``max_put`` more must still fit, or each side waits for the other for ever."""
    return batch_size + max_put - 1


def _time_first(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.swapaxes(0, 1)) if array.ndim > 1 else array


class TrajectoryAdder:
    """Cuts each env's stream of steps into trajectories of ``length`` decisions and puts every
    finished one into the queue. Consecutive trajectories of an env share one observation: the
    bootstrap observation of one is the first of the next.

    Per batch: :meth:`observe` what the env returned, then :meth:`record_actions` for the actions
    sent back (with the policy's extras and the weight version that chose them). Envs may come in
    any subset and order. EnvPool's reset step (after an episode end) stays in the trajectory as
    a row marked not ``applied``: its reward and flags are the reset's, not a transition's.
    """

    def __init__(self, queue: RolloutQueue, num_envs: int, obs_shape: tuple[int, ...],
                 obs_dtype: np.dtype, action_shape: tuple[int, ...], action_dtype: np.dtype,
                 extras: Extras):
        self._queue = queue
        t, n = queue.length, num_envs
        self.length = t
        self._obs = np.zeros((n, t + 1, *obs_shape), obs_dtype)
        self._applied = np.zeros((n, t + 1), bool)
        self._actions = np.zeros((n, t, *action_shape), action_dtype)
        self._rewards = np.zeros((n, t), np.float32)
        self._terminated = np.zeros((n, t), bool)
        self._truncated = np.zeros((n, t), bool)
        self._version = np.zeros(n, np.int64)
        self._extras = {name: np.zeros((n, t, *shape), dtype) for name, (shape, dtype) in extras.items()}
        self._t = np.zeros(n, np.int64)  # the row of each env's latest observation
        self._has_prev = np.zeros(n, bool)
        self._has_action = np.zeros(n, bool)

    def pending(self, env_ids) -> int:
        """How many trajectories :meth:`observe` will finish (and put) for this batch."""
        ids = np.asarray(env_ids, np.int64)
        return int(np.count_nonzero(self._has_prev[ids] & (self._t[ids] == self.length - 1)))

    def observe(self, env_ids, obs, rewards, terminated, truncated) -> int:
        """Take in what the envs returned; returns the number of trajectories finished."""
        ids = np.asarray(env_ids, np.int64)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        has_prev = self._has_prev[ids]
        if np.any(has_prev & ~self._has_action[ids]):
            raise RuntimeError("observe() for an env whose previous observation got no action: "
                               "call record_actions() with the actions sent")
        prev, t = ids[has_prev], self._t[ids[has_prev]]
        self._rewards[prev, t] = np.asarray(rewards)[has_prev]
        self._terminated[prev, t] = terminated[has_prev]
        self._truncated[prev, t] = truncated[has_prev]
        self._t[prev] = t + 1
        rows = self._t[ids]
        self._obs[ids, rows] = obs
        self._applied[ids, rows] = ~(terminated | truncated)  # a final obs: its action is ignored
        self._has_prev[ids] = True
        self._has_action[ids] = False
        full = ids[rows == self.length]
        if len(full):
            self._queue.put(
                {"obs": self._obs[full], "actions": self._actions[full], "rewards": self._rewards[full],
                 "terminated": self._terminated[full], "truncated": self._truncated[full],
                 "applied": self._applied[full, :-1], "weight_version": self._version[full]},
                {name: array[full] for name, array in self._extras.items()})
            self._obs[full, 0] = self._obs[full, -1]
            self._applied[full, 0] = self._applied[full, -1]
            self._t[full] = 0
        return len(full)

    def record_actions(self, env_ids, acted: Acted) -> None:
        """The actions sent for these envs' latest observations, what the policy returned beside
        them, and the weight version that chose them."""
        ids = np.asarray(env_ids, np.int64)
        if not self._has_prev[ids].all():
            raise RuntimeError("record_actions() for an env with no observation: call observe() first")
        rows = self._t[ids]
        self._actions[ids, rows] = acted.actions
        for name, array in self._extras.items():
            array[ids, rows] = acted.extras[name]
        starts = ids[rows == 0]
        self._version[starts] = acted.weight_version
        self._has_action[ids] = True

    def reset(self) -> None:
        """Forget every env's partial trajectory (call it when the envs are reset)."""
        self._has_prev[:] = False
        self._has_action[:] = False
        self._t[:] = 0


class OnPolicyActor(Actor):
    """An inline actor for trajectory data. With ``wait_for_learner`` (PPO), each batch that
    finishes trajectories is followed by a pause until the learner publishes weights trained on
    them: no action is ever chosen by stale weights. In serial mode the learner runs in that
    pause (:attr:`Actor.learn_now`)."""

    def __init__(self, *args, wait_for_learner: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.wait_for_learner = wait_for_learner
        if wait_for_learner:  # every batch may follow an update: look at the store each time
            self.policy.pull_every = 1

    def act_batch(self, step: Step) -> np.ndarray:
        t0 = time.perf_counter()
        pending = self.adder.pending(step.env_ids)
        self.observe(step)
        self.recorder.timer.add("insert", time.perf_counter() - t0)
        if pending and self.wait_for_learner and self.learn_now is not None:
            self.learn_now()
        return self._act(step)

    async def run(self, limiter: RolloutQueue, on_steps) -> None:
        self.env.async_reset()
        timer = self.recorder.timer
        try:
            while True:
                t0 = time.perf_counter()
                if self.wait_for_learner:
                    # Acting and learning alternate, so nothing else needs the loop while the
                    # envs step, and a thread hand-off per batch costs more than a small env's step.
                    step = self.env.recv()
                    await asyncio.sleep(0)
                else:
                    step = await self.env.arecv()
                t1 = time.perf_counter()
                pending = await self.admit(limiter, step.env_ids)
                t2 = time.perf_counter()
                self.observe(step)
                t3 = time.perf_counter()
                if pending and self.wait_for_learner:
                    await self._await_new_weights(limiter)
                t4 = time.perf_counter()
                self.env.send(self._act(step), step.env_ids)
                timer.add("env_wait", t1 - t0)
                timer.add("insert_wait", t2 - t1)
                timer.add("insert", t3 - t2)
                timer.add("learner_wait", t4 - t3)
                if on_steps():
                    return
        except LimiterStopped:
            return

    async def _await_new_weights(self, queue: RolloutQueue) -> None:
        # The learner may run in a thread (inline actors) or in this loop: poll the shared
        # version, yielding to the loop between looks.
        while self.store.version <= self.weight_version:
            if queue.stopped:
                raise LimiterStopped("rollout queue stopped")
            await asyncio.sleep(0.0005)
