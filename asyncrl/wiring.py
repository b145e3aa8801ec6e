"""Wiring: what a run is made of and what feeds what, in one function (:func:`build`), with
where actors run (:func:`placement`). The :class:`Trainer` owns the parts it returns: it starts
them, schedules evaluations and checkpoints, and closes them."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from asyncrl import registry
from asyncrl.actor import Actor
from asyncrl.adders import NStepAdder
from asyncrl.config import Config, ConfigError, require_memory, with_run_defaults
from asyncrl.core import Algorithm, EnvSpec, SequenceData, TrajectoryData, actor_state_spec
from asyncrl.envs import VecEnv, make_env
from asyncrl.learner import Learner, QueueDraw, ReplayDraw, pick_device
from asyncrl.metrics import Recorder
from asyncrl.process_actor import SLOTS, ProcessActor, start_fork_server
from asyncrl.ratelimit import RateLimiter
from asyncrl.replay import Replay
from asyncrl.rollout import OnPolicyActor, RolloutQueue, TrajectoryAdder, min_queue_capacity
from asyncrl.sequence import SequenceAdder, SequenceReplay
from asyncrl.staging import Staging
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")


@dataclass
class Components:
    config: Config
    spec: EnvSpec
    algo: Algorithm
    replay: Replay | SequenceReplay | RolloutQueue  # on-policy: the rollout queue is both the store and the limiter
    limiter: RateLimiter | RolloutQueue
    store: WeightStore
    recorder: Recorder
    actors: list[Actor | ProcessActor]
    learner: Learner
    remote: Any = None  # the Ray backend (actors.backend = "ray"): closed after the actors


def placement(config: Config, device: torch.device, env_fn: Callable | None) -> str:
    """Where actors run. auto: in worker processes when the learner is on the CPU (acting and
    learning then do not share one GIL), inline when it is on CUDA (its launches barely hold the
    GIL), and inline in serial mode or for an env given as a Python callable. ``ray``: remote
    actors (actors.backend = "ray")."""
    if config.actors.backend == "ray":
        if env_fn is not None:
            raise ConfigError("actors.backend = 'ray' needs an env id, not a Python env factory")
        return "ray"
    chosen = config.actors.placement
    if chosen == "auto":
        inline = config.train.mode == "serial" or device.type == "cuda" or env_fn is not None
        return "inline" if inline else "process"
    if chosen == "process" and env_fn is not None:
        raise ConfigError("actors.placement = 'process' needs an env id, not a Python env factory")
    return chosen


def build(config: Config, recorder: Recorder, env_fn: Callable | None = None) -> Components:
    """Everything a run is made of, and what feeds what, in one screen."""
    params = algo_params(config)  # its errors before any env starts
    e, seed, n = config.env, config.train.seed, config.actors.num_actors
    try:
        device = pick_device(config.learner.device)
    except ValueError as exc:
        raise ConfigError(f"invalid config: learner.device: {exc}") from None
    where = placement(config, device, env_fn)
    if where == "process":  # its imports (seconds) overlap the probe env's and the networks'
        start_fork_server()
    env_args = [dict(env_id=e.id, num_envs=e.num_envs, batch_size=e.batch_size, seed=seed + i * e.num_envs,
                     kwargs=e.kwargs, max_errors_in_a_row=e.max_errors_in_a_row, obs_indices=e.obs_indices) for i in range(n)]
    envs: list[VecEnv] = []
    try:
        if where == "inline":
            envs = [make_env(**args, env_fn=env_fn) for args in env_args]
            spec = envs[0].spec
        else:  # the workers make their own envs; one small env tells the spec (and checks the id)
            spec = probe_spec(config)
        algo = make_algo(config, spec, device, params)
        state_spec = actor_state_spec(algo)
        if state_spec and where == "ray":
            raise ConfigError(f"{config.algo.name} carries a recurrent actor state, which remote "
                              f"actors do not carry yet: use actors.backend = 'local'")
    except BaseException:
        for env in envs:
            env.close()
        raise
    data, r = algo.data, config.replay
    if isinstance(data, TrajectoryData):
        try:
            return _build_on_policy(config, recorder, env_fn, spec, algo, data, device, where, envs,
                                    env_args)
        except BaseException:
            for env in envs:
                env.close()
            raise
    # actors -> adders -> replay (under the limiter) -> learner -> weight store -> actors
    alpha = r.priority_exponent if r.prioritized else 0.0
    # A stored step: its observation, action and recurrent state, and ~32 bytes of reward, flags,
    # position and sampling bookkeeping. A drawn transition holds two observations; a sequence
    # its steps; the learner draws up to max_updates_per_call batches at once.
    step_bytes = 32 + sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in
                          [(spec.obs_shape, spec.obs_dtype), (spec.action_shape, spec.action_dtype),
                           *(state_spec or {}).values()])
    chunk, batch = config.learner.max_updates_per_call, config.learner.batch_size
    per_item = data.length if isinstance(data, SequenceData) else 2
    try:
        require_memory("replay.capacity", f"a replay of {r.capacity} steps", r.capacity * step_bytes)
        require_memory("learner.batch_size", f"drawing {chunk} batches of {batch}",
                       chunk * batch * per_item * step_bytes)
        # Process actors write their steps into the replay's rings themselves: shared memory.
        shared = dict(shared=where == "process", writers_ahead=SLOTS if where == "process" else 0)
        if shared["shared"]:
            require_shared_memory(r.capacity * step_bytes)
        if isinstance(data, SequenceData):
            replay: Replay | SequenceReplay = SequenceReplay(
                r.capacity, config.num_streams, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                spec.action_dtype, data.length, data.period, state_spec, priority_exponent=alpha,
                seed=seed, **shared)
        else:
            replay = Replay(r.capacity, config.num_streams, spec.obs_shape, spec.obs_dtype,
                            spec.action_shape, spec.action_dtype, data.n_step, data.gamma,
                            priority_exponent=alpha, seed=seed, **shared)
    except BaseException as exc:
        for env in envs:
            env.close()
        if isinstance(exc, MemoryError):
            raise ConfigError(f"invalid config: replay.capacity: a replay of {r.capacity} steps does "
                              "not fit in this machine's memory") from None
        if isinstance(exc, ValueError) and not isinstance(exc, ConfigError):
            raise ConfigError(f"invalid config: replay: {exc}") from None
        raise
    limiter = RateLimiter(r.samples_per_insert, r.min_size_to_sample, config.error_buffer,
                          config.learner.batch_size, sampleable=lambda: replay.num_sampleable)
    store = WeightStore.for_module(algo.acting_network)
    store.publish(algo.acting_network)

    def adder(i: int) -> Callable[[Any], NStepAdder]:
        """Actor ``i``'s adder, given the store (or a worker's stand-in for it) to write."""
        args = dict(streams_offset=i * e.num_envs, num_envs=e.num_envs, obs_shape=spec.obs_shape,
                    obs_dtype=spec.obs_dtype, action_shape=spec.action_shape, action_dtype=spec.action_dtype)
        if isinstance(replay, SequenceReplay):
            return partial(SequenceAdder, **args, state_spec=state_spec)
        return partial(NStepAdder, **args)

    actors: list[Actor | ProcessActor] = []
    remote = None
    if where == "inline":
        actors = [Actor(env, algo, store, adder(i)(replay), recorder, np.random.default_rng([seed, i]),
                        config.actors.pull_every) for i, env in enumerate(envs)]
    elif where == "ray":
        remote, actors = _ray_actors(config, spec, store, env_args, lambda i: adder(i)(replay), recorder)
    else:
        actors = _process_actors(config, env_args, store, replay, adder, recorder)
    _steps_checked(actors, config)
    total = config.train.total_env_steps
    beta0 = r.importance_exponent if r.prioritized else 0.0

    def importance_exponent() -> float:  # annealed linearly to 1 over the run
        return beta0 + (1.0 - beta0) * min(1.0, recorder.env_steps / total) if beta0 else 0.0

    draw = ReplayDraw(replay, config.learner.batch_size, importance_exponent, Staging(device), recorder.timer)
    learner = Learner(algo, limiter, draw, store, recorder, config.learner.batch_size,
                      config.learner.publish_every, config.learner.max_updates_per_call,
                      config.learner.max_nonfinite_in_a_row, config.learner.flush_denormal)
    return Components(config, spec, algo, replay, limiter, store, recorder, actors, learner, remote)


def algo_params(config: Config) -> tuple[type[Algorithm], BaseModel]:
    """The configured algorithm's class and its checked parameters, completed from the run
    (:func:`~asyncrl.config.with_run_defaults`: PPO anneals over the run's budget)."""
    cls = registry.get(config.algo.name)
    return cls, registry.algo_config(cls, with_run_defaults(cls.Config, config.algo.params, config))


def make_algo(config: Config, spec: EnvSpec, device: torch.device,
              params: tuple[type[Algorithm], BaseModel] | None = None) -> Algorithm:
    """The configured algorithm for ``spec`` on ``device``, seeded as every run seeds it (the bench
    builds its own from here too); ConfigError when it refuses the env. ``params``:
    :func:`algo_params`'s answer, where it was made already."""
    cls, algo_config = params or algo_params(config)
    torch.manual_seed(config.train.seed)
    try:
        return cls(spec, algo_config, device)
    except ValueError as exc:  # the algorithm refuses this env (e.g. continuous actions)
        raise ConfigError(f"{config.algo.name} cannot train on {config.env.id}: {exc}") from None


def probe_spec(config: Config) -> EnvSpec:
    """The env's spec from one small env of the config's id (which also checks the id)."""
    e = config.env
    with make_env(e.id, 1, None, config.train.seed, e.kwargs, obs_indices=e.obs_indices) as probe:
        return probe.spec


def learner_batch_size(config: Config, data: Any) -> int:
    """Items the learner takes per update: every env's trajectory at once where acting waits for
    each update (PPO, policy lag 0), else ``learner.batch_size``."""
    if isinstance(data, TrajectoryData) and data.wait_for_learner:
        return config.num_streams
    return config.learner.batch_size


def _ray_actors(config: Config, spec: EnvSpec, store: WeightStore, env_args: list[dict[str, Any]],
                adder: Callable, recorder: Recorder, extras: dict | None = None) -> tuple[Any, list]:
    """Remote actors, one Ray actor each, on whatever nodes the cluster places them."""
    from asyncrl.ray_actor import RayActor, RayBackend  # Ray is optional: imported only here

    backend = RayBackend(config.actors.ray, store)
    actors: list = []
    try:
        for i in range(config.actors.num_actors):
            actors.append(RayActor(backend, i, spec, env_args[i], config.algo.name, config.algo.params,
                                   store, adder(i), recorder, config.train.seed,
                                   config.actors.pull_every, extras))
    except BaseException:
        for actor in actors:
            actor.close()
        backend.close()
        raise
    return backend, actors


def _build_on_policy(config: Config, recorder: Recorder, env_fn: Callable | None, spec: EnvSpec,
                     algo: Algorithm, data: TrajectoryData, device: torch.device, where: str,
                     envs: list[VecEnv], env_args: list[dict[str, Any]]) -> Components:
    """The on-policy half of :func:`build`: actors -> trajectory adders -> FIFO rollout queue ->
    learner -> weight store -> actors."""
    e, streams = config.env, config.num_streams
    if actor_state_spec(algo):
        raise ConfigError(f"{config.algo.name} carries a recurrent actor state, which trajectory "
                          "data does not store yet (sequence data does)")
    batch = learner_batch_size(config, data)
    if data.wait_for_learner:
        # Acting pauses after each trajectory until the learner has trained on every env's one:
        # one update per rollout, published at once, with the envs stepping in lock-step.
        if e.actor_batch != e.num_envs:
            raise ConfigError(f"{config.algo.name} acts on fresh weights after each rollout: leave "
                              "env.batch_size unset (EnvPool's sync mode)")
        if where == "process" and config.actors.placement == "auto":
            where = "inline"  # acting and learning alternate: worker processes would not overlap them
            envs.extend(make_env(**args, env_fn=env_fn) for args in env_args)
        if where == "process":
            raise ConfigError(f"{config.algo.name} alternates acting and learning (policy lag 0), so "
                              "worker processes would not overlap them: use actors.placement = 'inline'")
        if where == "ray":
            raise ConfigError(f"{config.algo.name} alternates acting and learning (policy lag 0), so "
                              "remote actors would not overlap them: use actors.backend = 'local'")
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
    # A trajectory: T + 1 observations, T actions and extras, and 8 bytes a step of reward and flags.
    step_bytes = 8 + sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in
                         [(spec.action_shape, spec.action_dtype), *data.extras.values()])
    obs_bytes = int(np.prod(spec.obs_shape)) * spec.obs_dtype.itemsize
    trajectory_bytes = data.length * step_bytes + (data.length + 1) * obs_bytes
    require_memory("replay.queue_capacity" if config.replay.queue_capacity else "learner.batch_size",
                   f"a rollout queue of {capacity} trajectories", capacity * trajectory_bytes)
    queue = RolloutQueue(capacity, data.length, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                         spec.action_dtype, data.extras)
    store = WeightStore.for_module(algo.acting_network)
    store.publish(algo.acting_network)

    def adder(i: int) -> Callable[[Any], TrajectoryAdder]:
        """Actor ``i``'s adder, given the queue (or a worker's stand-in for it) to put into."""
        return partial(TrajectoryAdder, num_envs=e.num_envs, obs_shape=spec.obs_shape,
                       obs_dtype=spec.obs_dtype, action_shape=spec.action_shape,
                       action_dtype=spec.action_dtype, extras=data.extras)

    draw = QueueDraw(queue, batch, store, Staging(device), recorder.timer)
    learner = Learner(algo, queue, draw, store, recorder, batch, publish_every,
                      config.learner.max_updates_per_call, config.learner.max_nonfinite_in_a_row,
                      config.learner.flush_denormal, acting_waits=data.wait_for_learner)
    actors: list[Actor | ProcessActor] = []
    remote = None
    if where == "inline":
        for i, env in enumerate(envs):
            actor = OnPolicyActor(env, algo, store, adder(i)(queue), recorder, np.random.default_rng([config.train.seed, i]),
                                  config.actors.pull_every, wait_for_learner=data.wait_for_learner)
            if config.train.mode == "serial":
                actor.learn_now = learner.drain
            actors.append(actor)
    elif where == "ray":
        remote, actors = _ray_actors(config, spec, store, env_args, lambda i: adder(i)(queue), recorder,
                                     data.extras)
    else:
        actors = _process_actors(config, env_args, store, queue, adder, recorder)
    _steps_checked(actors, config)
    return Components(config, spec, algo, queue, queue, store, recorder, actors, learner, remote)


def _process_actors(config: Config, env_args: list[dict[str, Any]], store: WeightStore, data: Any,
                    adder: Callable, recorder: Recorder) -> list[ProcessActor]:
    """One worker process per actor, writing into ``data`` (the store) through ``adder(i)``;
    those started are closed if a later one fails to start."""
    actors: list[ProcessActor] = []
    try:
        for i in range(config.actors.num_actors):
            actors.append(ProcessActor(i, env_args[i], config.algo.name, config.algo.params, store, data,
                                       adder(i), i * config.env.num_envs, recorder, config.train.seed,
                                       config.actors.pull_every))
    except BaseException:
        for actor in actors:
            actor.close()
        raise
    return actors


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


def _steps_checked(actors: list, config: Config) -> None:
    """What every actor does with a step holding inf or nan (env.nonfinite), naming the env."""
    for actor in actors:
        actor.env_id, actor.nonfinite = config.env.id, config.env.nonfinite


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.algo.name}-{config.env.id}-{stamp}"
