"""An actor drives one env pool: receive a batch, pull weights when they moved, run the policy,
feed the adder, send the actions back."""

from __future__ import annotations

import time

import numpy as np
import torch

from asyncrl.adders import NStepAdder
from asyncrl.core import Algorithm
from asyncrl.envs import Step, VecEnv
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.weights import WeightStore


class Actor:
    def __init__(self, env: VecEnv, algo: Algorithm, store: WeightStore, adder: NStepAdder,
                 recorder: Recorder, rng: np.random.Generator, pull_every: int):
        self.env, self.algo, self.store, self.adder = env, algo, store, adder
        self.recorder, self.rng, self.pull_every = recorder, rng, pull_every
        self.network = algo.make_acting_network().eval()
        self.weight_version = -1
        self._batches = 0
        n = env.num_envs
        self._ep_return = np.zeros(n, np.float64)
        self._ep_length = np.zeros(n, np.int64)
        self._after_end = np.ones(n, bool)  # the first obs of an env follows a reset: not a step

    def pull(self) -> None:
        version = self.store.pull(self.network, self.weight_version)
        if version is not None:
            self.weight_version = version

    def act_batch(self, step: Step) -> np.ndarray:
        """Everything an actor does with one received batch; returns the actions to send."""
        ids = step.env_ids
        timer = self.recorder.timer
        t0 = time.perf_counter()
        self._track_episodes(step)
        self.adder.observe(ids, step.obs, step.rewards, step.terminated, step.truncated)
        t1 = time.perf_counter()
        if self._batches % self.pull_every == 0:
            self.pull()
        self._batches += 1
        actions = self.algo.act(self.network, torch.from_numpy(step.obs), self.recorder.env_steps, self.rng)
        self.adder.record_actions(ids, actions)
        t2 = time.perf_counter()
        timer.add("insert", t1 - t0)
        timer.add("inference", t2 - t1)
        return actions

    def _track_episodes(self, step: Step) -> None:
        ids = step.env_ids
        real = ~self._after_end[ids]  # the step right after an episode end is EnvPool's reset step
        self._ep_return[ids] += step.rewards * real
        self._ep_length[ids] += real
        done = step.terminated | step.truncated
        if done.any():
            ended = ids[done]
            self.recorder.episode_done(self._ep_return[ended].tolist(), self._ep_length[ended].tolist())
            self._ep_return[ended] = 0.0
            self._ep_length[ended] = 0
        self._after_end[ids] = done
        self.recorder.env_steps += int(real.sum())

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        """The async-mode loop; ``on_steps`` is the trainer's hook for step-count triggers."""
        self.env.async_reset()
        timer = self.recorder.timer
        try:
            while True:
                t0 = time.perf_counter()
                step = await self.env.arecv()
                t1 = time.perf_counter()
                pending = self.adder.pending(step.env_ids)
                if pending:
                    await limiter.await_insert(pending)
                t2 = time.perf_counter()
                self.env.send(self.act_batch(step), step.env_ids)
                timer.add("env_wait", t1 - t0)
                timer.add("insert_wait", t2 - t1)
                if on_steps():
                    return
        except LimiterStopped:
            return

    def staleness(self) -> int:
        return max(0, self.store.version - self.weight_version)
