"""Actors. Every actor's finished batches pass through :class:`ActorBase` in the loop's process
(episode statistics, the adder, the env-step count); an inline :class:`Actor` also runs EnvPool
and the policy there, a process actor (``process_actor.py``) runs them in a worker process."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from asyncrl.adders import NStepAdder
from asyncrl.core import Algorithm, StateSpec, acting_copy, actor_state_spec
from asyncrl.envs import Step, VecEnv
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")


class EnvStates:
    """Each env's actor state (e.g. an LSTM's h and c) as an algorithm declares it: zeros at an
    episode's first observation, then whatever the policy returned at the env's previous step."""

    def __init__(self, spec: StateSpec, num_envs: int):
        self._arrays = {name: np.zeros((num_envs, *shape), dtype) for name, (shape, dtype) in spec.items()}

    def reset(self, env_ids) -> None:
        for array in self._arrays.values():
            array[env_ids] = 0

    def get(self, env_ids) -> dict[str, np.ndarray]:
        return {name: array[env_ids] for name, array in self._arrays.items()}

    def set(self, env_ids, state: dict[str, torch.Tensor | np.ndarray]) -> None:
        for name, array in self._arrays.items():
            value = state[name]
            array[env_ids] = value.numpy() if isinstance(value, torch.Tensor) else value


def act_with_state(algo: Algorithm, network: torch.nn.Module, obs: np.ndarray, env_steps: int,
                   rng: np.random.Generator, states: EnvStates, env_ids: np.ndarray,
                   starts: np.ndarray, greedy: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A recurrent policy's actions for these envs: their states (zeroed where ``starts``, an
    episode's first observation) go in, the next ones are kept. Returns the actions and the
    states the actions were chosen with."""
    states.reset(env_ids[starts])
    state = states.get(env_ids)
    actions, next_state = algo.act(network, torch.from_numpy(obs), env_steps, rng, greedy=greedy,
                                   state={k: torch.from_numpy(v) for k, v in state.items()})
    states.set(env_ids, next_state)
    return actions, state


class ActorBase:
    """What the loop's process does with each finished batch, wherever the actor runs."""

    # What to do with a step holding inf or nan (env.nonfinite), and the env's id to name then.
    nonfinite: str = "stop"
    env_id: str = "env"

    def __init__(self, num_envs: int, store: WeightStore, adder: NStepAdder, recorder: Recorder):
        self.store, self.adder, self.recorder = store, adder, recorder
        self.weight_version = 0
        self.nonfinite_steps = 0  # steps whose inf or nan became 0 (env.nonfinite = "zero")
        self._ep_return = np.zeros(num_envs, np.float64)
        self._ep_length = np.zeros(num_envs, np.int64)
        self._after_end = np.ones(num_envs, bool)  # the first obs of an env follows a reset: not a step

    def observe(self, step: Step) -> None:
        """Episode statistics and the adder for one received batch."""
        self._check_finite(step)
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
        self.adder.observe(ids, step.obs, step.rewards, step.terminated, step.truncated)

    def _check_finite(self, step: Step) -> None:
        """Stop on, or zero and count, rewards and float observations that are inf or nan, as
        they arrive: learning from them would fail updates later, blaming the learner. Every
        actor kind's batches pass here; checking a batch costs microseconds."""
        float_obs = np.issubdtype(step.obs.dtype, np.floating)
        if np.isfinite(step.rewards).all() and (not float_obs or np.isfinite(step.obs).all()):
            return
        bad_reward = ~np.isfinite(step.rewards)
        bad_obs = (~np.isfinite(step.obs.reshape(len(step.obs), -1)).all(1) if float_obs
                   else np.zeros_like(bad_reward))
        if self.nonfinite == "stop":
            row = int(np.flatnonzero(bad_reward | bad_obs)[0])
            what = (f"reward ({step.rewards[row]})" if bad_reward[row] else
                    f"observation (holding {step.obs[row][~np.isfinite(step.obs[row])].flat[0]})")
            raise RunError(f"env {self.env_id} #{int(step.env_ids[row])} returned a non-finite {what} "
                           f"after {self.recorder.env_steps} env steps (env.nonfinite = 'stop'; "
                           "'zero' replaces such values with 0 and counts them)")
        if not self.nonfinite_steps:
            log.warning("env %s returned inf or nan: replaced with 0 and counted in "
                        "charts/nonfinite_steps (env.nonfinite = 'zero')", self.env_id)
        self.nonfinite_steps += int(np.count_nonzero(bad_reward | bad_obs))
        step.rewards = np.nan_to_num(step.rewards, nan=0.0, posinf=0.0, neginf=0.0)
        if float_obs:  # a new array: the batch may be a worker's shared memory or EnvPool's
            step.obs = np.nan_to_num(step.obs, nan=0.0, posinf=0.0, neginf=0.0)

    async def ingest(self, limiter: RateLimiter, step: Step, actions: np.ndarray,
                     extras: dict[str, np.ndarray] | None, version: int,
                     state: dict[str, np.ndarray] | None = None) -> None:
        """A batch acted on elsewhere (a worker process, a remote actor) with the weights of
        ``version``: wait for room under the limiter, take it in, record the actions that were
        sent. ``extras`` (what the policy returned beside the actions) goes to a trajectory
        adder with the version; ``state`` (the recurrent state each action was chosen with) to
        a sequence adder; neither to an n-step adder."""
        t0 = time.perf_counter()
        pending = self.adder.pending(step.env_ids)
        if pending:
            await limiter.await_insert(pending)
        t1 = time.perf_counter()
        self.observe(step)
        self.weight_version = version
        if extras is not None:
            self.adder.record_actions(step.env_ids, actions, extras, version)
        elif state is not None:
            self.adder.record_actions(step.env_ids, actions, state=state)
        else:
            self.adder.record_actions(step.env_ids, actions)
        timer = self.recorder.timer
        timer.add("insert_wait", t1 - t0)
        timer.add("insert", time.perf_counter() - t1)

    def staleness(self) -> int:
        return max(0, self.store.version - self.weight_version)


class Actor(ActorBase):
    """An inline actor: EnvPool's C++ threads step the envs, inference runs in the loop."""

    def __init__(self, env: VecEnv, algo: Algorithm, store: WeightStore, adder: NStepAdder,
                 recorder: Recorder, rng: np.random.Generator, pull_every: int):
        super().__init__(env.num_envs, store, adder, recorder)
        self.env, self.algo, self.rng, self.pull_every = env, algo, rng, pull_every
        self.network = acting_copy(algo)
        self._batches = 0
        spec = actor_state_spec(algo)
        self.states = EnvStates(spec, env.num_envs) if spec else None

    def act_batch(self, step: Step) -> np.ndarray:
        """Everything an actor does with one received batch; returns the actions to send."""
        timer = self.recorder.timer
        t0 = time.perf_counter()
        starts = self._after_end[step.env_ids]  # a copy: observations that begin an episode
        self.observe(step)
        t1 = time.perf_counter()
        if self._batches % self.pull_every == 0:
            version = self.store.pull(self.network, self.weight_version)
            if version is not None:
                self.weight_version = version
        self._batches += 1
        with torch.inference_mode():  # ~30% less per-op overhead than no_grad for small nets
            if self.states is None:
                actions = self.algo.act(self.network, torch.from_numpy(step.obs), self.recorder.env_steps, self.rng)
                self.adder.record_actions(step.env_ids, actions)
            else:
                actions, state = act_with_state(self.algo, self.network, step.obs, self.recorder.env_steps,
                                                self.rng, self.states, step.env_ids, starts)
                self.adder.record_actions(step.env_ids, actions, state=state)
        t2 = time.perf_counter()
        timer.add("insert", t1 - t0)
        timer.add("inference", t2 - t1)
        return actions

    def rng_state(self) -> dict:
        """The exploration RNG's state as plain (JSON-able) data, for a checkpoint; every actor
        kind has this pair, so that any placement resumes any other's checkpoint."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

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

    def close(self) -> None:
        self.env.close()
