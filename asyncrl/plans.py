"""Data plans: one per kind of data an algorithm declares (``algo.data``). A plan makes the kind's
store, the gate between acting and learning (a rate limiter, or the rollout queue, which is its
own), each actor's writer (its adder) and the learner's draw, and says where its actors may run.
:func:`asyncrl.wiring.build` picks the plan from :data:`PLANS` and wires everything else the same
way for every kind: one learner loop, one set of actor backends. A new kind of data (an offline
dataset, :mod:`asyncrl.offline`) is one new plan here and nothing else.

- :class:`TransitionPlan`: n-step transitions, uniform or prioritised (DQN, Rainbow, SAC, TD3);
  with ``replay.demonstrations``, a dataset's transitions mixed into each batch (a
  :class:`~asyncrl.draws.MixedDraw` over the online replay's draw and the dataset's; sequences
  alike, R2D3's way).
- :class:`SequencePlan`: fixed-length sequences with the actor's recurrent state (R2D2).
- :class:`TrajectoryPlan`: whole trajectories through a FIFO queue, each used once (PPO, IMPALA).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from asyncrl.actor import Actor
from asyncrl.adders import NStepAdder
from asyncrl.config import Config, ConfigError, require_memory
from asyncrl.core import (Algorithm, EnvSpec, SequenceData, TrajectoryData, TransitionData,
                          actor_state_spec)
from asyncrl.datasets import read_episodes  # Minari itself is imported when a dataset is read
from asyncrl.draws import MixedDraw, QueueDraw, ReplayDraw
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import RateLimiter
from asyncrl.replay import Replay
from asyncrl.rollout import OnPolicyActor, RolloutQueue, TrajectoryAdder, min_queue_capacity
from asyncrl.sequence import SequenceAdder, SequenceReplay
from asyncrl.staging import Staging
from asyncrl.weights import WeightStore


@dataclass
class Setting:
    """What a plan is made from: the run's config and what :func:`~asyncrl.wiring.build` decided
    before it (the env's spec, the algorithm, the learner's device, where actors run)."""

    config: Config
    spec: EnvSpec
    algo: Algorithm
    device: torch.device
    where: str  # "inline", "process", "ray" or "none" (an offline run)
    weights: WeightStore
    recorder: Recorder


@dataclass
class Data:
    """A plan's parts for one run."""

    store: Replay | SequenceReplay | RolloutQueue
    gate: RateLimiter | RolloutQueue
    draw: ReplayDraw | MixedDraw | QueueDraw
    # Actor i's adder, given the store (or a worker process's stand-in for it) to write into.
    adder: Callable[[int], Callable[[Any], Any]]
    batch_size: int  # items per update the gate counts (with demonstrations, the online part)
    publish_every: int  # updates between weight publishes
    actor_cls: type[Actor] = Actor  # the inline actor
    actor_kwargs: dict[str, Any] = field(default_factory=dict)
    acting_waits: bool = False  # acting pauses for each update (policy lag 0)
    slots: int = 1  # batches a process actor's worker may write ahead of the loop
    remote_extras: dict | None = None  # what remote actors return beside the actions


def learner_batch_size(config: Config, data: Any) -> int:
    """Items the learner takes per update: every env's trajectory at once where acting waits for
    each update (PPO, policy lag 0), else ``learner.batch_size``."""
    if isinstance(data, TrajectoryData) and data.wait_for_learner:
        return config.num_streams
    return config.learner.batch_size


def _nbytes(*specs: tuple[tuple[int, ...], Any]) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs)


class ReplayPlan:
    """Off-policy data in a replay of env streams under a samples-per-insert rate limiter; process
    actors write into the replay's shared-memory rings themselves."""

    def place(self, config: Config, algo: Algorithm, where: str) -> str:
        return where

    def make(self, s: Setting) -> Data:
        config, spec, r = s.config, s.spec, s.config.replay
        state_spec = actor_state_spec(s.algo)
        # A stored step: its observation, action and recurrent state, and ~32 bytes of reward,
        # flags, position and sampling bookkeeping. A drawn item holds _items_per_draw steps; the
        # learner draws up to max_updates_per_call batches at once.
        step_bytes = 32 + _nbytes((spec.obs_shape, spec.obs_dtype), (spec.action_shape, spec.action_dtype),
                                  *(state_spec or {}).values())
        chunk, batch = config.learner.max_updates_per_call, config.learner.batch_size
        require_memory("replay.capacity", f"a replay of {r.capacity} steps", r.capacity * step_bytes)
        require_memory("learner.batch_size", f"drawing {chunk} batches of {batch}",
                       chunk * batch * self._items_per_draw(s.algo.data) * step_bytes)
        demos = config.demo_batch_size  # items of each batch from replay.demonstrations
        # Read first: a missing or mismatched dataset stops the run before the replay is allocated.
        demo_replay = self._demonstrations(s) if demos else None
        prefill = read_episodes(r.prefill, s.spec) if r.prefill is not None else None
        shared = s.where == "process"  # worker processes write the replay's rings themselves
        if shared:
            require_shared_memory(r.capacity * step_bytes)
        slots = self._slots(config.actors.slots, s.algo.data)
        try:
            replay = self._replay(s, r.priority_exponent if r.prioritized else 0.0,
                                  dict(shared=shared, writers_ahead=slots if shared else 0))
        except MemoryError:
            raise ConfigError(f"invalid config: replay.capacity: a replay of {r.capacity} steps does "
                              "not fit in this machine's memory") from None
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid config: replay: {exc}") from None
        # With demonstrations the limiter counts only a batch's online items: it keeps the online
        # replay's samples per insert (how often each step actors insert is learnt from), which
        # demonstrations do not draw on (as Reverb counts only its own table's samples in Acme's
        # R2D3). So updates per env step rise by batch / online.
        online = batch - demos
        limiter = RateLimiter(r.samples_per_insert, r.min_size_to_sample, config.error_buffer,
                              online, sampleable=lambda: replay.num_sampleable)
        if prefill is not None:
            from asyncrl.offline import prefill as write_prefill

            rows = write_prefill(s, replay, prefill)
            # Learning may start at once (the replay holds min_size_to_sample and more); the
            # ratio holds from there: the dataset's rows are not inserts the learner may catch up on.
            limiter.try_insert(min(rows, r.min_size_to_sample))
        total, beta0 = config.train.total_env_steps, r.importance_exponent if r.prioritized else 0.0
        recorder = s.recorder

        def importance_exponent() -> float:  # annealed linearly to 1 over the run
            return beta0 + (1.0 - beta0) * min(1.0, recorder.env_steps / total) if beta0 else 0.0

        draw: ReplayDraw | MixedDraw = ReplayDraw(replay, online, importance_exponent, Staging(s.device),
                                                  recorder.timer)
        if demo_replay is not None:
            draw = MixedDraw(draw, ReplayDraw(demo_replay, demos, importance_exponent, Staging(s.device),
                                              recorder.timer))
        e = config.env

        def adder(i: int) -> Callable[[Any], Any]:
            return partial(self._adder_cls, streams_offset=i * e.num_envs, num_envs=e.num_envs,
                           obs_shape=spec.obs_shape, obs_dtype=spec.obs_dtype,
                           action_shape=spec.action_shape, action_dtype=spec.action_dtype,
                           **self._adder_kwargs(s))

        return Data(replay, limiter, draw, adder, online, config.learner.publish_every, slots=slots)

    # What a kind of replay changes: its adder class, the steps a drawn item holds, its store.
    _adder_cls: type

    def _slots(self, configured: int, data: Any) -> int:
        return configured

    def _items_per_draw(self, data: Any) -> int:
        raise NotImplementedError

    def _replay(self, s: Setting, alpha: float, shared: dict[str, Any]) -> Replay | SequenceReplay:
        raise NotImplementedError

    def _adder_kwargs(self, s: Setting) -> dict[str, Any]:
        return {}

    def _demonstrations(self, s: Setting) -> Replay | SequenceReplay:
        from asyncrl.offline import dataset_replay  # imports the dataset reader (Minari, lazily)

        # Read by the learner in this process only: no shared memory. A sampling RNG of its own.
        return dataset_replay(s, s.config.replay.demonstrations, [s.config.train.seed, 1])


class TransitionPlan(ReplayPlan):
    """n-step transitions (a drawn one holds two observations)."""

    _adder_cls = NStepAdder

    def _items_per_draw(self, data: TransitionData) -> int:
        return 2

    def _replay(self, s: Setting, alpha: float, shared: dict[str, Any]) -> Replay:
        spec, data = s.spec, s.algo.data
        return Replay(s.config.replay.capacity, s.config.num_streams, spec.obs_shape, spec.obs_dtype,
                      spec.action_shape, spec.action_dtype, data.n_step, data.gamma,
                      priority_exponent=alpha, seed=s.config.train.seed, **shared)



class SequencePlan(ReplayPlan):
    """Sequences of ``length`` steps with the actor state at their first step."""

    _adder_cls = SequenceAdder

    def _items_per_draw(self, data: SequenceData) -> int:
        return data.length

    def _slots(self, configured: int, data: SequenceData) -> int:
        # A sequence leaves the tree length - 1 steps before its slots are overwritten: writers
        # may run no further ahead (each slot is one step of every env of a batch).
        return min(configured, data.length - 1)

    def _replay(self, s: Setting, alpha: float, shared: dict[str, Any]) -> SequenceReplay:
        spec, data = s.spec, s.algo.data
        return SequenceReplay(s.config.replay.capacity, s.config.num_streams, spec.obs_shape,
                              spec.obs_dtype, spec.action_shape, spec.action_dtype, data.length,
                              data.period, actor_state_spec(s.algo), priority_exponent=alpha,
                              seed=s.config.train.seed, **shared)

    def _adder_kwargs(self, s: Setting) -> dict[str, Any]:
        return {"state_spec": actor_state_spec(s.algo)}


class TrajectoryPlan:
    """On-policy data: actors -> trajectory adders -> FIFO rollout queue (the gate too) ->
    learner. With ``wait_for_learner`` (PPO) acting pauses for each update, so actors stay inline
    (worker processes would not overlap anything)."""

    def place(self, config: Config, algo: Algorithm, where: str) -> str:
        name, data = config.algo.name, algo.data
        if actor_state_spec(algo):
            raise ConfigError(f"{name} carries a recurrent actor state, which trajectory "
                              "data does not store yet (sequence data does)")
        if not data.wait_for_learner:
            return where
        if config.env.actor_batch != config.env.num_envs:
            raise ConfigError(f"{name} acts on fresh weights after each rollout: leave "
                              "env.batch_size unset (EnvPool's sync mode)")
        if where == "process" and config.actors.placement == "auto":
            return "inline"  # acting and learning alternate: worker processes would not overlap them
        if where == "process":
            raise ConfigError(f"{name} alternates acting and learning (policy lag 0), so "
                              "worker processes would not overlap them: use actors.placement = 'inline'")
        if where == "ray":
            raise ConfigError(f"{name} alternates acting and learning (policy lag 0), so "
                              "remote actors would not overlap them: use actors.backend = 'local'")
        return where

    def make(self, s: Setting) -> Data:
        config, spec, data = s.config, s.spec, s.algo.data
        e, streams = config.env, config.num_streams
        batch = learner_batch_size(config, data)
        if data.wait_for_learner:  # one update per rollout, published at once
            capacity, publish_every = streams, 1
        else:
            publish_every = config.learner.publish_every
            capacity = config.replay.queue_capacity or 2 * max(batch, streams)
            # One actor batch can finish a trajectory in each of its envs at once.
            least = min_queue_capacity(batch, e.actor_batch)
            if capacity < least:
                raise ConfigError(
                    f"invalid config: replay.queue_capacity ({capacity}) must be at least {least}: "
                    f"learner.batch_size ({batch}) + the envs an actor steps per batch ({e.actor_batch}) "
                    "- 1, or actors and learner can wait for each other for ever")
        # A trajectory: T + 1 observations, T actions and extras, 8 bytes a step of reward and flags.
        step_bytes = 8 + _nbytes((spec.action_shape, spec.action_dtype), *data.extras.values())
        trajectory_bytes = data.length * step_bytes + (data.length + 1) * _nbytes((spec.obs_shape, spec.obs_dtype))
        require_memory("replay.queue_capacity" if config.replay.queue_capacity else "learner.batch_size",
                       f"a rollout queue of {capacity} trajectories", capacity * trajectory_bytes)
        queue = RolloutQueue(capacity, data.length, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                             spec.action_dtype, data.extras)
        draw = QueueDraw(queue, batch, s.weights, Staging(s.device), s.recorder.timer)

        def adder(i: int) -> Callable[[Any], TrajectoryAdder]:
            return partial(TrajectoryAdder, num_envs=e.num_envs, obs_shape=spec.obs_shape,
                           obs_dtype=spec.obs_dtype, action_shape=spec.action_shape,
                           action_dtype=spec.action_dtype, extras=data.extras)

        return Data(queue, queue, draw, adder, batch, publish_every, OnPolicyActor,
                    {"wait_for_learner": data.wait_for_learner}, acting_waits=data.wait_for_learner,
                    remote_extras=data.extras, slots=config.actors.slots)


# The plan for each kind of data an algorithm can declare.
PLANS: dict[type, ReplayPlan | TrajectoryPlan] = {
    TransitionData: TransitionPlan(), SequenceData: SequencePlan(), TrajectoryData: TrajectoryPlan()}


def plan_for(data: Any, config: Config | None = None) -> Any:
    """The plan for an algorithm's kind of data; an offline run's (``replay.dataset``) draws the
    same kind from a dataset (:mod:`asyncrl.offline`)."""
    if config is not None and config.replay.dataset is not None:
        from asyncrl.offline import OfflinePlan  # imports the dataset reader (Minari, lazily)

        return OfflinePlan()
    if config is not None and config.replay.prefill is not None and isinstance(data, TrajectoryData):
        raise ConfigError(f"invalid config: replay.prefill: {config.algo.name} learns from "
                          f"{type(data).__name__}, each used once as it is acted; a replay (n-step "
                          "transitions or sequences) starts with a dataset")
    if config is not None and config.replay.demonstrations is not None and isinstance(data, TrajectoryData):
        raise ConfigError(f"invalid config: replay.demonstrations: {config.algo.name} learns from "
                          f"{type(data).__name__}, each used once as it is acted; demonstrations mix into "
                          "replayed batches (n-step transitions: DQN, Rainbow, SAC, TD3; sequences: R2D2)")
    try:
        return PLANS[type(data)]
    except KeyError:
        raise TypeError(f"no data plan for {type(data).__name__}: add one to asyncrl.plans.PLANS") from None


def require_shared_memory(nbytes: int) -> None:
    """Refuse, in one line, a replay that process actors would write into but that does not fit
    in the shared-memory filesystem (writing past it kills the processes with SIGBUS)."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return  # no /dev/shm to measure (not Linux): torch's allocation says so if need be
    if nbytes > free:
        raise ConfigError(f"invalid config: replay.capacity: a replay of {nbytes / 2**30:.1f} GiB does "
                          f"not fit in shared memory (/dev/shm has {free / 2**30:.1f} GiB free), which "
                          "process actors write into: lower replay.capacity, or use "
                          "actors.placement = 'inline'")
