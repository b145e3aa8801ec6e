"""The trainer: one wiring function (:func:`build`) and one task group that owns every actor, the
learner, evaluation and checkpointing. ``Trainer.run()`` is awaited in the caller's event loop;
``Trainer.stop()`` ends the run cleanly (final evaluation and checkpoint); cancelling the task
that awaits ``run()`` ends it too, with the same cleanup."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from asyncrl import checkpoint, registry
from asyncrl.actor import Actor
from asyncrl.adders import NStepAdder
from asyncrl.config import EVAL_SEED_OFFSET, Config, ConfigError, require_memory, with_run_defaults
from asyncrl.core import Algorithm, EnvSpec, SequenceData, TrajectoryData, acting_copy, actor_state_spec
from asyncrl.envs import VecEnv, make_env
from asyncrl.evaluation import evaluate
from asyncrl.faults import RunError
from asyncrl.learner import Learner, pick_device, run_to_completion
from asyncrl.metrics import JsonlSink, Recorder, Sink, TensorBoardSink, truncate_jsonl
from asyncrl.policy import LivePolicy, Policy, spec_to_dict
from asyncrl.process_actor import ProcessActor, start_fork_server
from asyncrl.ratelimit import RateLimiter
from asyncrl.replay import Replay
from asyncrl.sequence import SequenceAdder, SequenceReplay
from asyncrl.stream import MetricStream
from asyncrl.rollout import (OnPolicyActor, RolloutQueue, TrajectoryAdder, TrajectoryLearner,
                             min_queue_capacity)
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")
# train.replay_checkpoint_every = None saves a replay up to this size with every checkpoint.
_AUTO_REPLAY_CHECKPOINT_BYTES = 512 * 2**20


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
    learner: Learner | TrajectoryLearner
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
    algo_cls = registry.get(config.algo.name)
    algo_config = registry.algo_config(algo_cls, with_run_defaults(algo_cls.Config, config.algo.params, config))
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
            with make_env(e.id, 1, None, seed, e.kwargs, obs_indices=e.obs_indices) as probe:
                spec = probe.spec
        torch.manual_seed(seed)
        try:
            algo = algo_cls(spec, algo_config, device)
        except ValueError as exc:  # the algorithm refuses this env (e.g. continuous actions)
            raise ConfigError(f"{config.algo.name} cannot train on {e.id}: {exc}") from None
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
        if isinstance(data, SequenceData):
            replay: Replay | SequenceReplay = SequenceReplay(
                r.capacity, config.num_streams, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                spec.action_dtype, data.length, data.period, state_spec, priority_exponent=alpha, seed=seed)
        else:
            replay = Replay(r.capacity, config.num_streams, spec.obs_shape, spec.obs_dtype,
                            spec.action_shape, spec.action_dtype, data.n_step, data.gamma,
                            priority_exponent=alpha, seed=seed)
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

    def adder(i: int) -> NStepAdder:
        if isinstance(replay, SequenceReplay):
            return SequenceAdder(replay, i * e.num_envs, e.num_envs, spec.obs_shape, spec.obs_dtype,
                                 spec.action_shape, spec.action_dtype, state_spec)
        return NStepAdder(replay, i * e.num_envs, e.num_envs, spec.obs_shape, spec.obs_dtype,
                          spec.action_shape, spec.action_dtype)

    actors: list[Actor | ProcessActor] = []
    remote = None
    if where == "inline":
        actors = [Actor(env, algo, store, adder(i), recorder, np.random.default_rng([seed, i]),
                        config.actors.pull_every) for i, env in enumerate(envs)]
    elif where == "ray":
        remote, actors = _ray_actors(config, spec, store, env_args, adder, recorder)
    else:
        try:
            for i in range(n):
                actors.append(ProcessActor(i, spec, env_args[i], config.algo.name, config.algo.params,
                                           store, adder(i), recorder, seed, config.actors.pull_every,
                                           state_spec=state_spec))
        except BaseException:
            for actor in actors:
                actor.close()
            raise
    for actor in actors:  # what it does with a step holding inf or nan
        actor.env_id, actor.nonfinite = e.id, e.nonfinite
    total = config.train.total_env_steps
    beta0 = r.importance_exponent if r.prioritized else 0.0

    def importance_exponent() -> float:  # annealed linearly to 1 over the run
        return beta0 + (1.0 - beta0) * min(1.0, recorder.env_steps / total) if beta0 else 0.0

    learner = Learner(algo, replay, limiter, store, recorder, device, config.learner.batch_size,
                      config.learner.publish_every, config.learner.max_updates_per_call,
                      importance_exponent, config.learner.max_nonfinite_in_a_row,
                      config.learner.flush_denormal)
    return Components(config, spec, algo, replay, limiter, store, recorder, actors, learner, remote)


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
    e, n, streams = config.env, config.actors.num_actors, config.num_streams
    if actor_state_spec(algo):
        raise ConfigError(f"{config.algo.name} carries a recurrent actor state, which trajectory "
                          "data does not store yet (sequence data does)")
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
        batch, capacity, publish_every = streams, streams, 1
    else:
        batch, publish_every = config.learner.batch_size, config.learner.publish_every
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

    def adder(i: int) -> TrajectoryAdder:
        return TrajectoryAdder(queue, e.num_envs, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                               spec.action_dtype, data.extras)

    learner = TrajectoryLearner(algo, queue, store, recorder, device, batch, publish_every,
                                config.learner.max_nonfinite_in_a_row, config.learner.flush_denormal)
    learner.acting_waits = data.wait_for_learner
    actors: list[Actor | ProcessActor] = []
    remote = None
    if where == "inline":
        for i, env in enumerate(envs):
            actor = OnPolicyActor(env, algo, store, adder(i), recorder, np.random.default_rng([config.train.seed, i]),
                                  config.actors.pull_every)
            actor.wait_for_learner = data.wait_for_learner
            if config.train.mode == "serial":
                actor.learn_now = learner.drain
            actors.append(actor)
    elif where == "ray":
        remote, actors = _ray_actors(config, spec, store, env_args, adder, recorder, data.extras)
    else:
        try:
            for i in range(n):
                actors.append(ProcessActor(i, spec, env_args[i], config.algo.name, config.algo.params,
                                           store, adder(i), recorder, config.train.seed,
                                           config.actors.pull_every, extras=data.extras))
        except BaseException:
            for actor in actors:
                actor.close()
            raise
    for actor in actors:  # what it does with a step holding inf or nan
        actor.env_id, actor.nonfinite = e.id, e.nonfinite
    return Components(config, spec, algo, queue, queue, store, recorder, actors, learner, remote)


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.algo.name}-{config.env.id}-{stamp}"


class Trainer:
    def __init__(self, config: Config, *, run_dir: str | Path | None = None, resume: bool = False,
                 sinks: list[Sink] | None = None, env_fn: Callable | None = None):
        self.config = config
        self.run_dir = Path(run_dir or config.train.run_dir or default_run_dir(config))
        self.resume = resume
        self._extra_sinks = list(sinks or [])
        self._env_fn = env_fn
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.c: Components | None = None
        self.result: dict[str, Any] = {}
        self._streams: list[MetricStream] = []
        self._live_recorder: Recorder | None = None
        self._ended = False
        self._ckpt_error = ""
        self._restored_replay = False

    @classmethod
    def from_algo(cls, algo: str = "dqn", *, env: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                  **kwargs: Any) -> Trainer:
        """A trainer for a registered algorithm: its preset, then ``env`` and ``overrides``
        (``key=value`` strings, as ``--set``). ``kwargs`` go to :class:`Trainer`."""
        return cls(registry.resolve_config(algo, None, env, overrides), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
                  **kwargs: Any) -> Trainer:
        """A trainer from a TOML config file (its ``[algo] name`` picks the preset under it),
        then ``overrides``. ``kwargs`` go to :class:`Trainer`."""
        return cls(registry.resolve_config(None, path, None, overrides), **kwargs)

    # --- public -------------------------------------------------------------------------------

    def metrics(self, maxlen: int = 1000) -> MetricStream:
        """``async for row in trainer.metrics()``: the rows of ``metrics.jsonl`` as the run
        emits them, ending when the run ends. Bounded (``maxlen`` rows): a consumer that falls
        behind loses the oldest rows (counted in ``.dropped``); training never waits for it.
        Open it before or during ``run()``."""
        stream = MetricStream(maxlen)
        self._streams.append(stream)
        if self._ended:
            stream.close()
        elif self._live_recorder is not None:
            self._live_recorder.listeners.append(stream.push)
        return stream

    def policy(self) -> Policy:
        """A callable ``obs -> actions`` (greedy) with its own copy of the acting network,
        refreshed from the weight store whenever the learner published newer weights. Thread-safe
        and safe while training runs (the store's lock-free read never holds the learner up).
        Callable once ``run()`` has started, and after it ended (the final weights)."""
        return LivePolicy(lambda: (self.c.algo, self.c.spec, self.c.store) if self.c else None)

    def stop(self) -> None:
        """Ask the run to end: actors and learner finish their batch, then final eval/checkpoint."""
        self._stopping = True
        self._stop_event.set()
        if self.c is not None:
            self.c.limiter.stop()

    @property
    def recorder(self) -> Recorder | None:
        return self.c.recorder if self.c else None

    async def run(self) -> dict[str, Any]:
        t = self.config.train
        self._live_recorder = recorder = Recorder(t.log_every, [])
        recorder.listeners.extend(stream.push for stream in self._streams)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self.config.learner.torch_threads)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="asyncrl-io")
        self._eval_env: VecEnv | None = None
        self._eval_net: torch.nn.Module | None = None
        try:
            # Start-up takes seconds (imports, the env probe, worker processes, networks, a
            # checkpoint to restore): on the I/O thread, so that a host's event loop goes on.
            await self._off_loop(self._start, recorder)
            c = self.c
            if self._stopping:  # stop() came while the run was starting
                c.limiter.stop()
            recorder.queue_probe = self.queues
            recorder.counter_probe = self.counters
            self._next_eval = (recorder.env_steps // t.eval_every + 1) * t.eval_every
            self._next_ckpt = (recorder.env_steps // t.checkpoint_every + 1) * t.checkpoint_every
            self._last_eval_version = -1
            self._eval_due, self._ckpt_due = asyncio.Event(), asyncio.Event()
            log.info("run directory %s", self.run_dir)
            try:
                if recorder.env_steps < t.total_env_steps:
                    await (self._run_serial() if t.mode == "serial" else self._run_async())
            except asyncio.CancelledError:
                # Every task has ended (the task group waited for them): the state is consistent.
                try:
                    await self._off_loop(self._final_checkpoint)
                except RunError as exc:
                    log.error("%s", exc)
                raise
            except BaseExceptionGroup as group:  # a task's one-line error, not wrapped in a group
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], (RunError, ConfigError)):
                    raise group.exceptions[0] from None
                raise
            await self._off_loop(self._finish_sync)
        finally:
            try:
                await self._off_loop(self._close)  # joins worker processes: seconds at worst
            finally:
                self._io.shutdown(wait=True)  # idle by now: _close was its last job
                torch.set_num_threads(threads_before)
                self._ended = True
                for stream in self._streams:
                    stream.close()
        return self.result

    async def _off_loop(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the I/O thread, so the event loop (a host's too) keeps running. If the
        awaiting task is cancelled meanwhile, ``fn`` still finishes before the cancellation goes
        on: what it built is owned, and closed, by this run."""
        return await run_to_completion(self._io, _stop_iteration_raised, fn, *args)

    def _start(self, recorder: Recorder) -> None:
        """Build the run (on the I/O thread), restore a checkpoint when resuming, open the run
        directory."""
        t = self.config.train
        ckpt_dir = self.run_dir / "checkpoints"
        if not self.resume:
            self._refuse_used_run_dir()
        # Envs and networks first: a bad env id or config leaves no run directory behind.
        self.c = c = build(self.config, recorder, self._env_fn)
        self._replay_every = self._replay_checkpoint_every()
        self._ckpts_since_replay = 0
        restored = None
        if self.resume:
            restored = checkpoint.load_latest(ckpt_dir, accept=self._restore)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            if restored:
                # The killed run's rows and checkpoints past the one resumed from: its future, which
                # this run replaces (env steps never go backwards in metrics.jsonl).
                truncate_jsonl(self.run_dir / "metrics.jsonl", recorder.env_steps)
                checkpoint.discard_after(ckpt_dir, recorder.env_steps)
            recorder.sinks = [JsonlSink(self.run_dir / "metrics.jsonl"), *self._extra_sinks]
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {self.run_dir}: "
                              f"{exc.strerror or exc}") from None
        if t.tensorboard and TensorBoardSink.available():
            recorder.sinks.append(TensorBoardSink(self.run_dir / "tb"))
        self._last_ckpt_step = recorder.env_steps if restored else -1
        if restored:
            log.info("resumed from %s at %d env steps%s", restored[0], recorder.env_steps,
                     "" if self._restored_replay else " (the checkpoint holds no replay: it fills anew)")

    def _refuse_used_run_dir(self) -> None:
        """A fresh run never mixes its checkpoints and metrics with an earlier run's."""
        used = [name for name in ("metrics.jsonl", "checkpoints") if (self.run_dir / name).exists()]
        if used:
            raise ConfigError(f"{self.run_dir} already holds a run ({' and '.join(used)}): continue it "
                              f"with --resume {self.run_dir} (Trainer(..., resume=True)) or choose "
                              "another run directory")

    # --- the two modes -----------------------------------------------------------------------

    async def _run_async(self) -> None:
        c = self.c
        async with asyncio.TaskGroup() as tg:
            for actor in c.actors:
                tg.create_task(actor.run(c.limiter, self._on_steps))
            tg.create_task(c.learner.run(in_thread=isinstance(c.actors[0], Actor)))
            tg.create_task(self._evaluator())
            tg.create_task(self._checkpointer())
            tg.create_task(self._watch_stop())

    async def _run_serial(self) -> None:
        """The same components in one task, in a fixed order: deterministic for a seed."""
        c = self.c
        batch = c.learner.batch_size
        for actor in c.actors:
            actor.env.async_reset()
        while not self._stopping:
            for actor in c.actors:
                step = actor.env.recv()
                pending = actor.adder.pending(step.env_ids)
                while pending and not c.limiter.try_insert(pending):
                    if not c.limiter.try_sample(batch):
                        raise RuntimeError("rate limiter refuses both insert and sample")
                    c.learner.step()
                actor.env.send(actor.act_batch(step), step.env_ids)
                done = self._on_steps()
                while c.limiter.try_sample(batch):
                    c.learner.step()
                if self._eval_due.is_set():
                    self._eval_due.clear()
                    self._evaluate_sync()
                if self._ckpt_due.is_set():
                    self._ckpt_due.clear()
                    self._checkpoint_sync()
                if done:
                    self._stopping = True
                    break
            await asyncio.sleep(0)  # let a stop() or a signal in

    def _on_steps(self) -> bool:
        """Called after every actor batch: logging, evaluation and checkpoint triggers, the end."""
        rec, t = self.c.recorder, self.config.train
        rec.maybe_log()
        if rec.env_steps >= self._next_eval:
            self._next_eval = (rec.env_steps // t.eval_every + 1) * t.eval_every
            self._eval_due.set()
        if rec.env_steps >= self._next_ckpt:
            self._next_ckpt = (rec.env_steps // t.checkpoint_every + 1) * t.checkpoint_every
            self._ckpt_due.set()
        if rec.env_steps >= t.total_env_steps and not self._stopping:
            self.stop()
        return self._stopping

    async def _watch_stop(self) -> None:
        await self._stop_event.wait()
        self.c.limiter.stop()
        self._eval_due.set()
        self._ckpt_due.set()

    async def _evaluator(self) -> None:
        while True:
            await self._eval_due.wait()
            self._eval_due.clear()
            if self._stopping:
                return
            # With a target return, the evaluated weights must be the ones kept if the run stops
            # on them: learning pauses while such an evaluation runs (acting goes on).
            held = self.c.learner.lock if self.config.train.target_return is not None else nullcontext()
            async with held:
                network, version = self._eval_network()
                returns = await self._off_loop(self._eval_returns, network)
                self._record_eval(returns, version)

    async def _checkpointer(self) -> None:
        while True:
            await self._ckpt_due.wait()
            self._ckpt_due.clear()
            if self._stopping:
                return
            async with self.c.learner.lock:  # no update in flight: a consistent state
                snapshot = self._snapshot()
            await self._off_loop(self._save, *snapshot)

    # --- evaluation and checkpoints -----------------------------------------------------------

    def _eval_network(self) -> tuple[torch.nn.Module, int]:
        """The latest published policy, copied into the evaluator's own network, and its version."""
        if self._eval_net is None:
            self._eval_net = acting_copy(self.c.algo)
        version = self.c.store.pull(self._eval_net, -1)
        return self._eval_net, version

    def _eval_returns(self, network: torch.nn.Module) -> list[float]:
        e, t = self.config.env, self.config.train
        if self._eval_env is None:
            kwargs = {**e.kwargs, **e.eval_kwargs}
            self._eval_env = make_env(e.id, t.eval_episodes, None, self.config.eval_seed, kwargs, self._env_fn,
                                      e.max_errors_in_a_row, e.obs_indices)
            self._eval_rng = np.random.default_rng([t.seed, EVAL_SEED_OFFSET])
        return evaluate(self._eval_env, self.c.algo, network, self._eval_rng)

    def _record_eval(self, returns: list[float], version: int) -> None:
        rec = self.c.recorder
        row = rec.log_eval(returns)
        self._last_eval_version = version
        target = self.config.train.target_return
        if target is not None and row["eval/return_mean"] >= target:
            log.info("evaluation reached the target return %.1f: stopping", target)
            self.result["reached_target_at"] = rec.env_steps
            self.stop()

    def _evaluate_sync(self) -> None:
        network, version = self._eval_network()
        self._record_eval(self._eval_returns(network), version)

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """What a checkpoint holds, taken between updates (the caller holds the learner's lock or
        runs serially): counters, config, RNG states of every actor, the algorithm's state and,
        when due, copies of the replay's arrays and the limiter's counts."""
        c, rec = self.c, self.c.recorder
        manifest = {
            "env_steps": rec.env_steps, "updates": rec.updates, "episodes": rec.episodes,
            "wall_s": rec.wall_s, "weight_version": c.store.version,
            "config": self.config.to_dict(), "env_spec": spec_to_dict(c.spec),
            # JSON text: a PCG64 state holds 128-bit integers, which msgpack cannot.
            "actor_rngs": [json.dumps(a.rng_state()) for a in c.actors],
        }
        state = {"algo": _to_cpu(c.algo.state_dict()), "torch_rng": torch.get_rng_state()}
        replay = None
        if self._replay_every and self._ckpts_since_replay + 1 >= self._replay_every:
            # Copies: the loop goes on inserting while the I/O thread writes them.
            replay = {k: v.copy() if isinstance(v, np.ndarray) else v
                      for k, v in c.replay.state_dict().items()}
            manifest["limiter"] = c.limiter.state_dict()
        return manifest, state, replay

    def _replay_checkpoint_every(self) -> int:
        """0 (never) for on-policy runs, whose queue holds only trajectories not yet learned from."""
        every = self.config.train.replay_checkpoint_every
        if not isinstance(self.c.limiter, RateLimiter) or every == 0:
            return 0
        if every is None:
            nbytes = sum(v.nbytes for v in self.c.replay.state_dict().values() if isinstance(v, np.ndarray))
            return 1 if nbytes <= _AUTO_REPLAY_CHECKPOINT_BYTES else 0
        return every

    def _save(self, manifest: dict[str, Any], state: dict[str, Any], replay: dict[str, Any] | None) -> bool:
        """False when the write failed (a full disk, no permission): the previous checkpoint
        stays as it was and training goes on; the next checkpoint tries again."""
        t0 = time.perf_counter()
        try:
            path = checkpoint.save(self.run_dir / "checkpoints", manifest["env_steps"], manifest, state,
                                   self.config.train.keep_checkpoints, replay=replay)
        except OSError as exc:
            self._ckpt_error = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            log.error("checkpoint at %d env steps failed (%s); the previous one is kept and "
                      "training goes on", manifest["env_steps"], self._ckpt_error)
            return False
        self._last_ckpt_step = manifest["env_steps"]
        if replay is None:
            self._ckpts_since_replay += 1
            log.info("checkpoint %s", path)
        else:
            self._ckpts_since_replay = 0
            size = sum(v.nbytes for v in replay.values() if isinstance(v, np.ndarray))
            log.info("checkpoint %s (with the replay: %.1f MB in %.2f s)", path, size / 1e6,
                     time.perf_counter() - t0)
        return True

    def _checkpoint_sync(self, final: bool = False) -> bool:
        if final:  # a resumed run continues from the last checkpoint: it carries the replay
            self._ckpts_since_replay = max(self._ckpts_since_replay, self._replay_every - 1)
        return self._save(*self._snapshot())

    def _final_checkpoint(self) -> None:
        if self._last_ckpt_step != self.c.recorder.env_steps and not self._checkpoint_sync(final=True):
            kept = checkpoint.checkpoints(self.run_dir / "checkpoints")
            raise RunError(f"the final checkpoint could not be written ({self._ckpt_error}); "
                           + (f"the newest on disk is {kept[0]}" if kept else "no checkpoint on disk"))

    def _restore(self, path: Path, manifest: dict[str, Any], state: dict[str, Any]) -> None:
        """Load checkpoint ``path`` into the built run. Raises (KeyError, ValueError,
        RuntimeError) when it does not fit this run; :func:`checkpoint.load_latest` then reports
        it and tries the next older one, whose load overwrites whatever this one set."""
        c = self.c
        c.algo.load_state_dict(state["algo"])
        torch.set_rng_state(state["torch_rng"])
        rngs = manifest.get("actor_rngs", [])
        if rngs and len(rngs) != len(c.actors):
            raise ValueError(f"it holds {len(rngs)} actors' RNG states for {len(c.actors)} actors")
        replay = checkpoint.load_replay(path) if self._replay_every else None
        if replay is not None:  # everything that can refuse it is read before the replay is written
            limiter = manifest["limiter"]
            c.replay.load_state_dict(replay)
            c.limiter.load_state_dict(limiter)
            # The envs start new episodes: no return may run from a saved step into them.
            c.replay.cut(np.arange(self.config.num_streams))
        for actor, rng_state in zip(c.actors, rngs):
            actor.set_rng_state(json.loads(rng_state))
        self._restored_replay = replay is not None
        c.recorder.resume_at(manifest["env_steps"], manifest["updates"], manifest["episodes"],
                             manifest["wall_s"])
        c.store.publish(c.algo.acting_network)

    def _finish_sync(self) -> None:
        """After the tasks ended: a last evaluation and the final checkpoint."""
        rec = self.c.recorder
        self.result["train_wall_s"] = rec.wall_s  # training alone, before the final eval and save
        if self._last_eval_version != self.c.store.version and rec.env_steps > 0:
            self._evaluate_sync()  # the final policy has not been evaluated yet
        self._final_checkpoint()
        rec.log_row()
        self.result.update(env_steps=rec.env_steps, updates=rec.updates, wall_s=rec.wall_s,
                           eval=dict(rec.last_eval), run_dir=str(self.run_dir))

    def queues(self) -> dict[str, float]:
        c = self.c
        stats = c.limiter.stats()
        return {
            "replay_size": c.replay.size, "replay_fill": c.replay.fill,
            "insert_wait_s": stats["insert_wait_s"], "sample_wait_s": stats["sample_wait_s"],
            "weight_staleness": max(a.staleness() for a in c.actors),
            **({"policy_lag": c.learner.policy_lag} if isinstance(c.learner, TrajectoryLearner) else {}),
        }

    def counters(self) -> dict[str, float]:
        """Faults survived so far (``charts/`` in each row)."""
        c = self.c
        counters = {"skipped_updates": c.learner.guard.skipped_updates,
                    "nonfinite_steps": sum(a.nonfinite_steps for a in c.actors),
                    "env_errors": sum(getattr(a.env, "errors", 0) for a in c.actors if isinstance(a, Actor))}
        if c.remote is not None:  # remote actors that died and were restarted by Ray
            counters["actor_restarts"] = sum(a.restarts for a in c.actors)
        return counters

    def _close(self) -> None:
        """Stop every actor (joining worker processes), close the envs and the sinks."""
        if self.c is not None:
            self.c.limiter.stop()
            for actor in self.c.actors:
                actor.close()
            if self.c.remote is not None:
                self.c.remote.close()
            self.c.recorder.close()
        if self._eval_env is not None:
            self._eval_env.close()

def _stop_iteration_raised(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, a StopIteration from it (an exhausted iterator in a user's env factory)
    raised as a RuntimeError: a future cannot carry a StopIteration, and its awaiter would wait
    for ever."""
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"StopIteration escaped from {getattr(fn, '__qualname__', fn)}") from exc


def _to_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict on the CPU, safe to write while training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state
