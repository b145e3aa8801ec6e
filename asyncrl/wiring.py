"""Wiring: what a run is made of and what feeds what, in one function (:func:`build`), with
where actors run (:func:`placement`); the algorithm's kind of data brings its own parts
(:mod:`asyncrl.plans`). The :class:`Trainer` owns the parts it returns: it starts
them, schedules evaluations and checkpoints, and closes them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from asyncrl import registry
from asyncrl.actor import Actor
from asyncrl.config import Config, ConfigError, with_run_defaults
from asyncrl.core import Algorithm, EnvSpec, TrajectoryData, actor_state_spec, needs_dataset
from asyncrl.distributed import check_data_parallel
from asyncrl.envs import VecEnv, make_env
from asyncrl.inference import CentralInference
from asyncrl.learner import Learner, deterministic_on_cuda, pick_device, set_tf32
from asyncrl.learner_group import LearnerGroup
from asyncrl.metrics import Recorder
from asyncrl.plans import Data, Setting, learner_batch_size, plan_for
from asyncrl.process_actor import ProcessActor, start_fork_server
from asyncrl.ratelimit import RateLimiter
from asyncrl.replay import Replay
from asyncrl.rollout import RolloutQueue
from asyncrl.sequence import SequenceReplay
from asyncrl.weights import WeightStore

__all__ = ["Components", "build", "placement", "algo_params", "make_algo", "probe_spec",
           "learner_batch_size", "default_run_dir"]

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
    inference: CentralInference | None = None  # central inference: a task beside the actors


def placement(config: Config, device: torch.device, env_fn: Callable | None) -> str:
    """Where actors run. auto: in worker processes when the learner is on the CPU (acting and
    learning then do not share one GIL) or inference is central (on CUDA by default), inline on
    CUDA with local inference (its launches barely hold the GIL), and inline in serial mode or for
    an env given as a Python callable. ``ray``: remote
    actors (actors.backend = "ray"). ``none``: an offline run (replay.dataset)."""
    if config.replay.dataset is not None:
        return "none"  # learning from a dataset: no actor acts
    if config.actors.backend == "ray":
        if env_fn is not None:
            raise ConfigError("actors.backend = 'ray' needs an env id, not a Python env factory")
        return "ray"
    chosen = config.actors.placement
    if chosen == "auto":
        inline = (config.train.mode == "serial" or env_fn is not None
                  or device.type == "cuda" and config.actors.inference == "local")
        return "inline" if inline else "process"
    if chosen == "process" and env_fn is not None:
        raise ConfigError("actors.placement = 'process' needs an env id, not a Python env factory")
    return chosen


def central_inference(config: Config, device: torch.device, where: str) -> bool:
    """Whether actors placed ``where`` ask one central inference task for their actions
    (actors.inference; auto: process actors of a CUDA learner)."""
    chosen = config.actors.inference
    if where == "none":  # an offline run: nothing acts
        return False
    if chosen == "central" and where != "process":
        raise ConfigError(f"invalid config: actors.inference = 'central' batches worker processes' "
                          f"observations, and {config.algo.name}'s actors run {where} here (an env given "
                          "as a Python callable, or acting that waits for each update): use local or auto")
    return where == "process" and (chosen == "central" or chosen == "auto" and device.type == "cuda")


def build(config: Config, recorder: Recorder, env_fn: Callable | None = None) -> Components:
    """Everything a run is made of, and what feeds what, in one screen: actors -> their adders ->
    the data plan's store (under its gate) -> learner -> weight store -> actors. The plan
    (:mod:`asyncrl.plans`) is the algorithm's kind of data; the rest is the same for every kind."""
    params = algo_params(config)  # its errors before any env starts
    if needs_dataset(params[0]) and config.replay.dataset is None:
        raise ConfigError(f"{config.algo.name} learns from a dataset only: add --dataset ID (--set "
                          "replay.dataset=ID); python -m asyncrl record makes one from a trained run")
    e, seed = config.env, config.train.seed
    try:
        device = pick_device(config.learner.device)
    except ValueError as exc:
        raise ConfigError(f"invalid config: learner.device: {exc}") from None
    if config.train.mode == "serial" and device.type == "cuda":
        deterministic_on_cuda()
    where = placement(config, device, env_fn)
    if where == "process":  # its imports (seconds) overlap the probe env's and the networks'
        start_fork_server()
    env_args = [dict(env_id=e.id, num_envs=e.num_envs, batch_size=e.batch_size, seed=seed + i * e.num_envs,
                     kwargs=e.kwargs, max_errors_in_a_row=e.max_errors_in_a_row, obs_indices=e.obs_indices)
                for i in range(config.actors.num_actors)]
    envs: list[VecEnv] = []
    try:
        if where == "inline":
            envs = [make_env(**args, env_fn=env_fn) for args in env_args]
            spec = envs[0].spec
        else:  # the workers make their own envs; one small env tells the spec (and checks the id)
            spec = probe_spec(config)
        algo = make_algo(config, spec, device, params)
        learners = config.learner.num_learners
        if learners > 1:  # one line before any learner or actor process starts
            _check_learners(config, algo, device)
        if actor_state_spec(algo) and where == "ray":
            raise ConfigError(f"{config.algo.name} carries a recurrent actor state, which remote "
                              f"actors do not carry yet: use actors.backend = 'local'")
        plan = plan_for(algo.data, config)
        where = plan.place(config, algo, where)
        central = central_inference(config, device, where)
        if where == "inline" and not envs:  # the plan keeps actors inline
            envs.extend(make_env(**args, env_fn=env_fn) for args in env_args)
        store = WeightStore.for_module(algo.acting_network)
        store.publish(algo.acting_network)
        # Data-parallel learners take their batches from shared memory on the CPU, each rank
        # moving its shard to its own device.
        draws_on = device if learners == 1 else torch.device("cpu")
        data = plan.make(Setting(config, spec, algo, draws_on, where, store, recorder))
        learner_args = (algo, data.gate, data.draw, store, recorder, data.batch_size, data.publish_every,
                        config.learner.max_updates_per_call, config.learner.max_nonfinite_in_a_row,
                        config.learner.flush_denormal)
        learner = (Learner(*learner_args, acting_waits=data.acting_waits) if learners == 1
                   else LearnerGroup(*learner_args, config=config, spec=spec))
        actors: list[Actor | ProcessActor] = []
        remote = inference = None
        if where == "inline":
            actors = [data.actor_cls(env, algo, store, data.adder(i)(data.store), recorder,
                                     np.random.default_rng([seed, i]), config.actors.pull_every,
                                     **data.actor_kwargs) for i, env in enumerate(envs)]
            if config.train.mode == "serial" and data.acting_waits:  # the actor runs the updates itself
                for actor in actors:
                    actor.learn_now = learner.drain
        elif where == "none":  # an offline run: a clock stands in for the actors
            actors = [data.actor_cls(store, recorder)]
        elif where == "ray":
            remote, actors = _ray_actors(config, spec, store, env_args, lambda i: data.adder(i)(data.store),
                                         recorder, data.remote_extras)
        else:
            if central:  # one forward on the learner's device for all
                inference = CentralInference(algo, spec, store, device, config.num_streams,
                                             np.random.default_rng([seed, 0]), config.actors.pull_every, recorder)
            actors = _process_actors(config, env_args, store, data, recorder, inference)
    except BaseException:
        for env in envs:
            env.close()
        raise
    _steps_checked(actors, config)
    return Components(config, spec, algo, data.store, data.gate, store, recorder, actors, learner, remote,
                      inference)


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
    set_tf32(device, config.learner.tf32)  # every learner, data-parallel ranks and the bench alike
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


def _process_actors(config: Config, env_args: list[dict[str, Any]], store: WeightStore, data: Data,
                    recorder: Recorder, inference: CentralInference | None = None) -> list[ProcessActor]:
    """One worker process per actor, writing into the plan's store through its adder, up to the
    plan's slots ahead; those started are closed if a later one fails to start."""
    actors: list[ProcessActor] = []
    try:
        for i in range(config.actors.num_actors):
            actors.append(ProcessActor(i, env_args[i], config.algo.name, config.algo.params, store,
                                       data.store, data.adder(i), i * config.env.num_envs, recorder,
                                       config.train.seed, config.actors.pull_every, data.slots, inference))
    except BaseException:
        for actor in actors:
            actor.close()
        raise
    return actors


def _check_learners(config: Config, algo: Algorithm, device: torch.device) -> None:
    """What ``learner.num_learners > 1`` cannot run (see :func:`check_data_parallel`)."""
    n = config.learner.num_learners
    if device.type == "cuda" and torch.cuda.device_count() < n:  # NCCL refuses two ranks on one GPU
        raise ConfigError(f"invalid config: learner.num_learners = {n} on CUDA runs one learner per "
                          f"GPU, and this box has {torch.cuda.device_count()}: use at most that many, "
                          "or learner.device = 'cpu'")
    if isinstance(algo.data, TrajectoryData):
        raise ConfigError(f"invalid config: learner.num_learners = {n} learns from replayed data "
                          f"(transitions, sequences), and {config.algo.name} learns from trajectories "
                          "each used once (on-policy), which it does not support: use 1")
    check_data_parallel(algo, n, config.learner.batch_size)


def _steps_checked(actors: list, config: Config) -> None:
    """What every actor does with a step holding inf or nan (env.nonfinite), naming the env."""
    for actor in actors:
        actor.env_id, actor.nonfinite = config.env.id, config.env.nonfinite


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.algo.name}-{config.env.id}-{stamp}"
