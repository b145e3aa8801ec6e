"""The bench's measuring: five modes, each timed for ``seconds`` after a short warm-up, ``repeats``
times, interleaved by :func:`bench` so that drift in the machine's load hits every mode alike
(what each mode runs and how the ratios follow: :mod:`asyncrl.benchmark`).

The parts are made by the trainer's own wiring (:func:`~asyncrl.wiring.build`,
:func:`~asyncrl.wiring.make_algo`, :func:`~asyncrl.wiring.probe_spec`, ...), with only the
settings a mode needs changed (a limiter that refuses nothing, inline actors for the learner
mode, no evaluation or checkpoint in the window); the algorithm is touched only through the
:class:`~asyncrl.core.Algorithm` protocol.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from asyncrl.benchmark.report import FIGURES, summarize
from asyncrl.benchmark.synthetic import (fill_replay, random_actions, synthetic_batch,
                                         synthetic_trajectories)
from asyncrl.config import Config, ConfigError, deep_merge, validate
from asyncrl.core import EnvSpec, TrajectoryData, actor_state_spec
from asyncrl.envs import make_env
from asyncrl.learner import denormals_flushed, pick_device
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped
from asyncrl.rollout import RolloutQueue
from asyncrl.trainer import Trainer
from asyncrl.wiring import (Components, build, central_inference, learner_batch_size, make_algo, placement,
                            probe_spec)

_UNBOUNDED = 1e15  # an error buffer (in samples) wide enough that the limiter refuses nothing
_NEVER = 10**15  # env steps: "not during a benchmark"
_START_TIMEOUT_S = 300.0  # process actors to spawn, replay to reach min_size_to_sample, ...
_REPLAY_FILL = 3  # the learner mode's replay holds this many times min_size_to_sample


Progress = Callable[[str, int, float], None]  # (figure, repeat, value)


async def bench(config: Config, *, seconds: float = 5.0, repeats: int = 3,
                warmup_s: float | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every mode ``repeats`` times (interleaved) and return raw figures, medians and
    ratios; see the module docstring. Awaited inside the caller's loop, like ``Trainer.run``."""
    if not seconds > 0:
        raise ConfigError(f"--seconds must be > 0, got {seconds}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    warmup_s = min(1.0, seconds / 2) if warmup_s is None else warmup_s
    device = pick_device(config.learner.device)
    where = placement(config, device, None)
    spec = probe_spec(config)
    runs: dict[str, list[float]] = {name: [] for name in FIGURES}
    allreduce_shares: list[float] = []  # data-parallel learners: the all-reduce's share of an update
    offline = config.replay.dataset is not None

    def record(name: str, repeat: int, value: float) -> None:
        runs[name].append(value)
        if progress is not None:
            progress(name, repeat, value)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.learner.torch_threads)  # as the trainer does for its whole run
    try:
        for i in range(repeats):
            if offline:  # no env is stepped: the dataset is the data
                record("env_ceiling", i, math.nan)
                record("acting", i, math.nan)
            else:
                record("env_ceiling", i, measure_env_ceiling(config, spec, seconds, warmup_s))
                record("acting", i, await measure_acting(config, seconds, warmup_s))
            record("learning_ceiling", i, measure_learning_ceiling(config, spec, seconds, warmup_s))
            rate, allreduce = await measure_learner(config, seconds, warmup_s, in_thread=where in ("inline", "none"))
            record("learner", i, rate)
            allreduce_shares.append(allreduce)
            env_steps, updates = await measure_end_to_end(config, seconds, warmup_s)
            record("end_to_end_env_steps", i, env_steps)
            record("end_to_end_updates", i, updates)
    finally:
        torch.set_num_threads(threads_before)
    data = make_algo(config, spec, torch.device("cpu")).data
    on_policy = isinstance(data, TrajectoryData)
    # Where the learner's updates run, as the trainer would run them: beside inline actors in a
    # thread, unless acting waits for each update anyway (then in the loop, see Learner.run).
    in_thread = where in ("inline", "none") and not (on_policy and data.wait_for_learner)  # none: offline
    learner_runs = "serial" if config.train.mode == "serial" else "thread" if in_thread else "loop"
    per_update = (learner_batch_size(config, data) * data.length if on_policy
                  else None)  # on-policy: every trajectory step is used once
    return summarize(config, runs, per_update, in_turns=on_policy and data.wait_for_learner, offline=offline,
                     learner_allreduce_share=statistics.median(allreduce_shares),
                     device=str(device), learner_runs=learner_runs,
                     placement=f"{where}, central inference" if central_inference(config, device, where) else where,
                     seconds=seconds, warmup_s=warmup_s)


def run_bench(config: Config, **kwargs: Any) -> dict[str, Any]:
    """:func:`bench` in a fresh event loop (scripts, tests)."""
    return asyncio.run(bench(config, **kwargs))


# --- the five modes -------------------------------------------------------------------------------


def measure_env_ceiling(config: Config, spec: EnvSpec, seconds: float, warmup_s: float) -> float:
    """Env steps/s of one pool with random actions."""
    e = config.env
    rng = np.random.default_rng(config.train.seed)
    with make_env(e.id, e.num_envs, e.batch_size, config.train.seed, e.kwargs, obs_indices=e.obs_indices) as env:
        after_end = np.ones(env.num_envs, bool)  # counted like ActorBase.observe counts
        steps = 0

        def step() -> None:
            nonlocal steps
            s = env.recv()
            steps += int(np.count_nonzero(~after_end[s.env_ids]))
            after_end[s.env_ids] = s.terminated | s.truncated
            env.send(random_actions(spec, len(s.env_ids), rng), s.env_ids)

        env.async_reset()
        return _timed(step, lambda: steps, seconds, warmup_s)


async def measure_acting(config: Config, seconds: float, warmup_s: float) -> float:
    """Env steps/s of the configured actors, inserting into replay, with no learner."""
    recorder = Recorder(config.train.log_every, [])
    c = build(_with(config, {"replay": {"error_buffer": _UNBOUNDED}}), recorder)
    try:
        if config.train.mode == "serial":
            return _act_serial(c, seconds, warmup_s)
        done = False
        async with asyncio.TaskGroup() as tg:
            for actor in c.actors:
                tg.create_task(actor.run(c.limiter, lambda: done))
            if c.inference is not None:  # central inference acts for the process actors
                tg.create_task(c.inference.run())
            if isinstance(c.replay, RolloutQueue):
                tg.create_task(_take_and_republish(c))
            try:
                (rate,) = await _window(lambda: (recorder.env_steps,), lambda: recorder.env_steps > 0,
                                        seconds, warmup_s, "acting")
            finally:
                done = True
                c.limiter.stop()
        return rate
    finally:
        c.limiter.stop()
        for actor in c.actors:
            actor.close()


def measure_learning_ceiling(config: Config, spec: EnvSpec, seconds: float, warmup_s: float) -> float:
    """Updates/s of ``algo.update`` on one synthetic batch, nothing else."""
    device = pick_device(config.learner.device)
    algo = make_algo(config, spec, device)
    batch = synthetic_batch(spec, algo.data, learner_batch_size(config, algo.data), device,
                            np.random.default_rng(config.train.seed), actor_state_spec(algo))
    updates = 0

    def step() -> None:
        nonlocal updates
        algo.update(batch)
        updates += 1

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None  # the learner's device, not device 0
    with denormals_flushed(config.learner.flush_denormal):  # as the learner updates
        return _timed(step, lambda: updates, seconds, warmup_s, sync)


async def measure_learner(config: Config, seconds: float, warmup_s: float, in_thread: bool
                          ) -> tuple[float, float]:
    """Updates/s of the engine's learner on a replay of synthetic steps, with no actors, and
    (data-parallel learners) the gradient all-reduce's share of the update time, else nan."""
    recorder = Recorder(config.train.log_every, [])
    # Built inline: the learner needs no actors, and process actors would start workers for
    # nothing. Where updates run (thread or loop) still follows the real placement.
    c = build(_with(config, {"replay": {"error_buffer": _UNBOUNDED},
                             "actors": {"placement": "inline", "inference": "local"}}), recorder)
    try:
        for actor in c.actors:
            actor.close()
        if isinstance(c.replay, RolloutQueue):
            return await _measure_trajectory_learner(c, seconds, warmup_s, in_thread), math.nan
        r = config.replay
        if r.dataset is None:  # an offline run's replay holds its dataset, and its gate is open
            fill_replay(c.replay, c.spec, min(r.capacity, _REPLAY_FILL * r.min_size_to_sample),
                        np.random.default_rng(config.train.seed))
            c.limiter.try_insert(max(c.replay.size, r.min_size_to_sample))  # the limiter's bookkeeping
        if config.train.mode == "serial":
            def step() -> None:
                c.limiter.try_sample()
                c.learner.step()
            rate = _timed(step, lambda: recorder.updates, seconds, warmup_s)
            return rate, _ratio_or_nan(getattr(c.learner, "reduce_s", 0.0), getattr(c.learner, "update_s", 0.0))

        def counters() -> tuple[float, float, float]:  # data-parallel learners time their parts
            return recorder.updates, getattr(c.learner, "reduce_s", 0.0), getattr(c.learner, "update_s", 0.0)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(c.learner.run(in_thread=in_thread))
            try:
                rate, reducing, updating = await _window(counters, lambda: recorder.updates > 0,
                                                         seconds, warmup_s, "learner")
            finally:
                c.limiter.stop()
        return rate, _ratio_or_nan(reducing, updating)
    finally:
        c.limiter.stop()
        c.learner.close()


def _ratio_or_nan(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


async def measure_end_to_end(config: Config, seconds: float, warmup_s: float) -> tuple[float, float]:
    """(env steps/s, updates/s) of the whole trainer, once it updates, for ``seconds``."""
    # No evaluation or checkpoint during the window; the final ones (after trainer.stop()) are
    # outside it, and one eval episode keeps the final evaluation short.
    quiet = _with(config, {"train": {
        "total_env_steps": _NEVER, "eval_every": _NEVER, "checkpoint_every": _NEVER,
        "target_return": None, "eval_episodes": 1, "tensorboard": False, "run_dir": None}})
    with tempfile.TemporaryDirectory(prefix="asyncrl-bench-") as run_dir:
        trainer = Trainer(quiet, run_dir=run_dir)

        def counters() -> tuple[float, float]:
            return trainer.recorder.env_steps, trainer.recorder.updates

        async with asyncio.TaskGroup() as tg:
            tg.create_task(trainer.run())
            try:
                env_steps, updates = await _window(
                    counters, lambda: trainer.recorder is not None and trainer.recorder.updates > 0,
                    seconds, warmup_s, "end to end")
            finally:
                trainer.stop()
    return env_steps, updates


async def _measure_trajectory_learner(c: Components, seconds: float, warmup_s: float,
                                      in_thread: bool) -> float:
    """The learner mode for on-policy data: the queue is topped up with synthetic trajectories."""
    queue, rng = c.replay, np.random.default_rng(c.config.train.seed)
    fields, extras = synthetic_trajectories(c.spec, c.algo.data, 1, rng)
    one = ({k: v.swapaxes(0, 1) if v.ndim > 1 else v for k, v in fields.items()},
           {k: v.swapaxes(0, 1) for k, v in extras.items()})

    async def feed() -> None:
        try:
            while True:
                await queue.await_insert(1)
                queue.put(*one)
        except LimiterStopped:
            return

    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        tg.create_task(c.learner.run(in_thread=in_thread))
        try:
            (rate,) = await _window(lambda: (c.recorder.updates,), lambda: c.recorder.updates > 0,
                                    seconds, warmup_s, "learner")
        finally:
            queue.stop()
    return rate


async def _take_and_republish(c: Components) -> None:
    """The acting mode's stand-in learner for on-policy data: take every batch at once and, where
    actors wait for new weights, publish the same ones again."""
    queue, batch = c.replay, c.learner.batch_size
    try:
        while True:
            await queue.await_sample(batch)
            queue.take(batch)
            if c.algo.data.wait_for_learner:
                c.store.publish(c.algo.acting_network)
    except LimiterStopped:
        return


def _act_serial(c: Components, seconds: float, warmup_s: float) -> float:
    """Serial mode's acting half: every actor in turn, in one task (Trainer._run_serial)."""
    for actor in c.actors:
        actor.env.async_reset()

    def step() -> None:  # the acting mode's limiter refuses nothing: no learner is needed
        for actor in c.actors:
            actor.step_now(c.limiter, learn=lambda: False)

    return _timed(step, lambda: c.recorder.env_steps, seconds, warmup_s)


# --- timing ---------------------------------------------------------------------------------------


def _timed(step: Callable[[], None], count: Callable[[], int], seconds: float, warmup_s: float,
           sync: Callable[[], None] | None = None) -> float:
    """Rate of ``count`` while calling ``step`` for ``seconds``, after ``warmup_s`` of it."""
    clock = time.perf_counter
    warm_until = clock() + warmup_s
    while clock() < warm_until:
        step()
    if sync:
        sync()
    start, t0 = count(), clock()
    while clock() - t0 < seconds:
        step()
    if sync:
        sync()
    return (count() - start) / (clock() - t0)


async def _window(read: Callable[[], tuple[float, ...]], started: Callable[[], bool], seconds: float,
                  warmup_s: float, what: str) -> tuple[float, ...]:
    """Rates of the counters ``read`` returns over ``seconds``, once ``started`` and warmed up;
    the work runs in other tasks (or processes) meanwhile."""
    deadline = time.perf_counter() + _START_TIMEOUT_S
    while not started():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"bench {what}: nothing happened within {_START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.02)
    await asyncio.sleep(warmup_s)
    before, t0 = read(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, t1 = read(), time.perf_counter()
    return tuple((b - a) / (t1 - t0) for a, b in zip(before, after))


def _with(config: Config, changes: dict[str, Any]) -> Config:
    return validate(deep_merge(config.to_dict(), changes))
