"""Actors. Every actor's finished batches pass through :class:`ActorBase` in the loop's process
(episode statistics, the adder, the env-step count); an inline :class:`Actor` also runs EnvPool
and the policy there, a process actor (``process_actor.py``) runs them in a worker process."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from asyncrl.acting import Acted, PolicyStep
from asyncrl.adders import Adder
from asyncrl.core import Algorithm
from asyncrl.envs import Step, VecEnv
from asyncrl.episodes import Counted, Episodes, check_finite
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")


class ActorBase:
    """What the loop's process does with each finished batch, wherever the actor runs."""

    # What to do with a step holding inf or nan (env.nonfinite), and the env's id to name then.
    nonfinite: str = "stop"
    env_id: str = "env"

    def __init__(self, num_envs: int, store: WeightStore, adder: Adder, recorder: Recorder):
        self.store, self.adder, self.recorder = store, adder, recorder
        self.weight_version = 0
        self.nonfinite_steps = 0  # steps whose inf or nan became 0 (env.nonfinite = "zero")
        self.episodes = Episodes(num_envs)

    def observe(self, step: Step) -> None:
        """Episode statistics and the adder for one received batch."""
        zeroed = check_finite(step, self.nonfinite, self.env_id, self.recorder.env_steps)
        self.count_nonfinite(zeroed)
        self.count(self.episodes.count(step))
        self.adder.observe(step.env_ids, step.obs, step.rewards, step.terminated, step.truncated)

    def count(self, counted: Counted) -> None:
        """A batch's env steps and ended episodes, into the run's counters."""
        if len(counted.returns):
            self.recorder.episode_done(counted.returns.tolist(), counted.lengths.tolist())
        self.recorder.env_steps += counted.steps

    def count_nonfinite(self, zeroed: int) -> None:
        if zeroed and not self.nonfinite_steps:
            log.warning("env %s returned inf or nan: replaced with 0 and counted in "
                        "charts/nonfinite_steps (env.nonfinite = 'zero')", self.env_id)
        self.nonfinite_steps += zeroed

    # --- the insert handshake: room under the gate, observe, act (here or elsewhere), record ---

    async def admit(self, limiter: RateLimiter, env_ids: np.ndarray) -> int:
        """Wait until the gate (the rate limiter or the rollout queue) has room for what
        :meth:`observe` will insert for this batch, and reserve it; returns how much."""
        pending = self.adder.pending(env_ids)
        if pending:
            await limiter.await_insert(pending)
        return pending

    def admit_now(self, limiter: RateLimiter, env_ids: np.ndarray, learn: Callable[[], bool]) -> None:
        """:meth:`admit` in one task (serial mode): while the gate refuses, ``learn`` one update
        (False when the gate refuses that too: it would wait for ever)."""
        pending = self.adder.pending(env_ids)
        while pending and not limiter.try_insert(pending):
            if not learn():
                raise RuntimeError("rate limiter refuses both insert and sample")

    def record(self, env_ids: np.ndarray, acted: Acted) -> None:
        """The actions chosen for an observed batch (after :meth:`observe`), into the adder."""
        self.weight_version = acted.weight_version
        self.adder.record_actions(env_ids, acted)

    async def ingest(self, limiter: RateLimiter, step: Step, actions: np.ndarray,
                     extras: dict[str, np.ndarray] | None, version: int,
                     state: dict[str, np.ndarray] | None = None) -> None:
        """A batch acted on elsewhere (a worker process, a remote actor) with the weights of
        ``version``: wait for room under the limiter, take it in, record the actions that were
        sent with what the policy returned beside them (``extras``) and the recurrent state
        each action was chosen with (``state``)."""
        t0 = time.perf_counter()
        await self.admit(limiter, step.env_ids)
        t1 = time.perf_counter()
        self.observe(step)
        self.record(step.env_ids, Acted(actions, extras or {}, state or {}, version))
        timer = self.recorder.timer
        timer.add("insert_wait", t1 - t0)
        timer.add("insert", time.perf_counter() - t1)

    def staleness(self) -> int:
        return max(0, self.store.version - self.weight_version)


class Actor(ActorBase):
    """An inline actor: EnvPool's C++ threads step the envs, inference runs in the loop."""

    # Serial mode's way to run the learner's due updates from inside a batch, for an actor that
    # pauses for them (on-policy data that waits for the learner); the wiring sets it there.
    learn_now: Callable[[], None] | None = None

    def __init__(self, env: VecEnv, algo: Algorithm, store: WeightStore, adder: Adder,
                 recorder: Recorder, rng: np.random.Generator, pull_every: int):
        super().__init__(env.num_envs, store, adder, recorder)
        self.env, self.algo, self.pull_every = env, algo, pull_every
        self.policy = PolicyStep(algo, env.num_envs, rng, store=store, pull_every=pull_every)

    @property
    def rng(self) -> np.random.Generator:
        return self.policy.rng

    def reset_envs(self) -> None:
        """Serial mode: start every env's first episode."""
        self.env.async_reset()

    @property
    def network(self) -> torch.nn.Module:
        return self.policy.network

    def act_batch(self, step: Step) -> np.ndarray:
        """Everything an actor does with one received batch (room under the gate reserved);
        returns the actions to send."""
        t0 = time.perf_counter()
        self.observe(step)
        t1 = time.perf_counter()
        actions = self._act(step)
        self.recorder.timer.add("insert", t1 - t0)
        return actions

    def _act(self, step: Step) -> np.ndarray:
        """Act on an observed batch and record the actions; the env steps count this batch."""
        t0 = time.perf_counter()
        acted = self.policy.act(step.obs, step.env_ids, self.recorder.env_steps, step.terminated, step.truncated)
        self.record(step.env_ids, acted)
        self.recorder.timer.add("inference", time.perf_counter() - t0)
        return acted.actions

    def step_now(self, limiter: RateLimiter, learn: Callable[[], bool]) -> None:
        """One batch in one task (serial mode): receive, room under the gate (``learn`` makes
        some, see :meth:`admit_now`), observe, act, send."""
        step = self.env.recv()
        self.admit_now(limiter, step.env_ids, learn)
        self.env.send(self.act_batch(step), step.env_ids)

    def rng_state(self) -> dict:
        """The exploration RNG's state as plain (JSON-able) data, for a checkpoint; every actor
        kind has this pair, so that any placement resumes any other's checkpoint."""
        return self.policy.rng_state()

    def set_rng_state(self, state: dict) -> None:
        self.policy.set_rng_state(state)

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        """The async-mode loop; ``on_steps`` is the trainer's hook for step-count triggers and
        returns True when the run is over."""
        self.env.async_reset()
        timer = self.recorder.timer
        try:
            while True:
                t0 = time.perf_counter()
                step = await self.env.arecv()
                t1 = time.perf_counter()
                await self.admit(limiter, step.env_ids)
                t2 = time.perf_counter()
                self.env.send(self.act_batch(step), step.env_ids)
                timer.add("env_wait", t1 - t0)
                timer.add("insert_wait", t2 - t1)
                if on_steps():
                    return
        except LimiterStopped:
            return

    def close(self) -> None:
        self.env.close()
