"""``python -m asyncrl bench``: where one config's time goes, measured side by side in one process.

Five modes, each timed for ``seconds`` after a short warm-up, ``repeats`` times, interleaved so
that drift in the machine's load hits every mode alike:

- **env ceiling**: one EnvPool pool of the configured env (num_envs, batch_size, kwargs) stepped
  with random actions and nothing else: env steps/s *of one pool*, whatever ``num_actors`` is;
- **acting**: the configured actors where the trainer would put them (process actors included),
  with inference and replay inserts, under a limiter that refuses nothing, no learner;
- **learning ceiling**: ``algo.update`` on one pre-built synthetic batch on the learner's device,
  in a bare loop: updates/s;
- **learner**: the engine's learner (sample, host-to-device copy, update, priorities, publish)
  on a replay filled with synthetic steps, under a limiter that refuses nothing, no actors;
- **end to end**: the whole :class:`Trainer` at the configured samples-per-insert, with no
  evaluation or checkpoint until it is stopped.

Env steps are counted as the trainer counts them: the step after an episode end (EnvPool's reset
step, whose action is ignored) is not one. Ratios: acting / env ceiling (what inference, inserts
and the hand-offs cost acting), learner / learning ceiling (what sampling, copying and hand-offs
cost learning), and overlap efficiency = end-to-end env steps/s / min(acting env steps/s,
learner updates/s x inserts per update): how close the whole run gets to its slower side alone.
Where acting waits for each update (PPO's policy lag 0) the two cannot overlap, and the bound is
their series rate instead, 1 / (1 / acting + 1 / (learner x env steps per update)).

The algorithm is touched only through the :class:`~asyncrl.core.Algorithm` protocol: its
constructor and ``update`` on a synthetic batch. On-policy data (trajectories through the
rollout queue) is measured alike: acting drains the queue with a learner that only takes and
(for PPO, whose actors wait for new weights) republishes; the learner mode's queue is kept full
of synthetic trajectories.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from asyncrl import registry
from asyncrl.config import Config, ConfigError, deep_merge, validate
from asyncrl.core import (Algorithm, EnvSpec, SequenceBatch, SequenceData, StateSpec, TrajectoryBatch,
                          TrajectoryData, TransitionBatch, TransitionData, actor_state_spec)
from asyncrl.envs import make_env
from asyncrl.learner import denormals_flushed, pick_device
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped
from asyncrl.replay import Replay
from asyncrl.rollout import RolloutQueue
from asyncrl.sequence import SequenceReplay
from asyncrl.trainer import Trainer
from asyncrl.wiring import Components, build, placement

# figure name -> (mode it comes from, unit)
FIGURES: dict[str, tuple[str, str]] = {
    "env_ceiling": ("env ceiling", "env steps/s"),
    "acting": ("acting", "env steps/s"),
    "learning_ceiling": ("learning ceiling", "updates/s"),
    "learner": ("learner", "updates/s"),
    "end_to_end_env_steps": ("end to end", "env steps/s"),
    "end_to_end_updates": ("end to end", "updates/s"),
}
RATIOS = ("acting_over_env_ceiling", "learner_over_learning_ceiling", "overlap_efficiency")

_UNBOUNDED = 1e15  # an error buffer (in samples) wide enough that the limiter refuses nothing
_NEVER = 10**15  # env steps: "not during a benchmark"
_START_TIMEOUT_S = 300.0  # process actors to spawn, replay to reach min_size_to_sample, ...
_REPLAY_FILL = 3  # the learner mode's replay holds this many times min_size_to_sample


Progress = Callable[[str, int, float], None]  # (figure, repeat, value)


# --- the public entry points --------------------------------------------------------------------


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
    spec = _probe_spec(config)
    runs: dict[str, list[float]] = {name: [] for name in FIGURES}

    def record(name: str, repeat: int, value: float) -> None:
        runs[name].append(value)
        if progress is not None:
            progress(name, repeat, value)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.learner.torch_threads)  # as the trainer does for its whole run
    try:
        for i in range(repeats):
            record("env_ceiling", i, measure_env_ceiling(config, spec, seconds, warmup_s))
            record("acting", i, await measure_acting(config, seconds, warmup_s))
            record("learning_ceiling", i, measure_learning_ceiling(config, spec, seconds, warmup_s))
            record("learner", i, await measure_learner(config, seconds, warmup_s,
                                                       in_thread=where == "inline"))
            env_steps, updates = await measure_end_to_end(config, seconds, warmup_s)
            record("end_to_end_env_steps", i, env_steps)
            record("end_to_end_updates", i, updates)
    finally:
        torch.set_num_threads(threads_before)
    data = make_algo(config, spec, torch.device("cpu")).data
    on_policy = isinstance(data, TrajectoryData)
    # Where the learner's updates run, as the trainer would run them: beside inline actors in a
    # thread, unless acting waits for each update anyway (then in the loop, see TrajectoryLearner).
    in_thread = where == "inline" and not (on_policy and data.wait_for_learner)
    learner_runs = "serial" if config.train.mode == "serial" else "thread" if in_thread else "loop"
    per_update = (_batch_size(config, data) * data.length if on_policy
                  else None)  # on-policy: every trajectory step is used once
    return summarize(config, runs, per_update, in_turns=on_policy and data.wait_for_learner,
                     device=str(device), placement=where, learner_runs=learner_runs,
                     seconds=seconds, warmup_s=warmup_s)


def run_bench(config: Config, **kwargs: Any) -> dict[str, Any]:
    """:func:`bench` in a fresh event loop (scripts, tests)."""
    return asyncio.run(bench(config, **kwargs))


def summarize(config: Config, runs: dict[str, list[float]], inserts_per_update: float | None = None,
              in_turns: bool = False, **context: Any) -> dict[str, Any]:
    """Medians, spreads and ratios of raw per-repeat figures. ``inserts_per_update``: env steps
    one update consumes, given for on-policy data (default: from the replay's samples per
    insert, off-policy). ``in_turns``: acting waits for each update (PPO's policy lag 0), so
    acting and learning cannot overlap and the whole run's bound is their series rate,
    1 / (1 / acting + 1 / learner), not the slower one."""
    figures = {name: {"unit": FIGURES[name][1], "runs": values, "median": statistics.median(values),
                      "min": min(values), "max": max(values)} for name, values in runs.items()}
    median = {name: f["median"] for name, f in figures.items()}
    on_policy = inserts_per_update is not None  # only trajectory data says what an update takes
    if not on_policy:
        inserts_per_update = config.learner.batch_size / config.replay.samples_per_insert
    learner_env_steps = median["learner"] * inserts_per_update  # env steps/s the learner could serve
    if in_turns:
        bound = 1.0 / (1.0 / median["acting"] + 1.0 / learner_env_steps) if min(
            median["acting"], learner_env_steps) > 0 else 0.0
    else:
        bound = min(median["acting"], learner_env_steps)
    ratios = {
        "acting_over_env_ceiling": _ratio(median["acting"], median["env_ceiling"]),
        "learner_over_learning_ceiling": _ratio(median["learner"], median["learning_ceiling"]),
        "overlap_efficiency": _ratio(median["end_to_end_env_steps"], bound),
    }
    e = config.env
    return {
        **context,
        "torch_threads": config.learner.torch_threads,
        "repeats": len(runs["env_ceiling"]),
        "summary": {
            "algo": config.algo.name, "env_id": e.id, "num_envs": e.num_envs,
            "batch_size": e.actor_batch, "num_actors": config.actors.num_actors,
            "learner_batch": config.learner.batch_size,
            "samples_per_insert": config.replay.samples_per_insert, "mode": config.train.mode,
            "on_policy": on_policy,
        },
        "figures": figures,
        "inserts_per_update": inserts_per_update,
        "learner_env_steps_per_s": learner_env_steps,
        "in_turns": in_turns,
        "bound_env_steps_per_s": bound,
        "slower_side": "acting" if median["acting"] <= learner_env_steps else "learner",
        "ratios": ratios,
        "config": config.to_dict(),
    }


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
    batch = synthetic_batch(spec, algo.data, _batch_size(config, algo.data), device,
                            np.random.default_rng(config.train.seed), actor_state_spec(algo))
    updates = 0

    def step() -> None:
        nonlocal updates
        algo.update(batch)
        updates += 1

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with denormals_flushed(config.learner.flush_denormal):  # as the learner updates
        return _timed(step, lambda: updates, seconds, warmup_s, sync)


async def measure_learner(config: Config, seconds: float, warmup_s: float, in_thread: bool) -> float:
    """Updates/s of the engine's learner on a replay of synthetic steps, with no actors."""
    recorder = Recorder(config.train.log_every, [])
    # Built inline: the learner needs no actors, and process actors would start workers for
    # nothing. Where updates run (thread or loop) still follows the real placement.
    c = build(_with(config, {"replay": {"error_buffer": _UNBOUNDED}, "actors": {"placement": "inline"}}),
              recorder)
    try:
        for actor in c.actors:
            actor.close()
        if isinstance(c.replay, RolloutQueue):
            return await _measure_trajectory_learner(c, seconds, warmup_s, in_thread)
        r = config.replay
        fill_replay(c.replay, c.spec, min(r.capacity, _REPLAY_FILL * r.min_size_to_sample),
                    np.random.default_rng(config.train.seed))
        c.limiter.try_insert(max(c.replay.size, r.min_size_to_sample))  # the limiter's bookkeeping
        if config.train.mode == "serial":
            def step() -> None:
                c.limiter.try_sample()
                c.learner.step()
            return _timed(step, lambda: recorder.updates, seconds, warmup_s)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(c.learner.run(in_thread=in_thread))
            try:
                (rate,) = await _window(lambda: (recorder.updates,), lambda: recorder.updates > 0,
                                        seconds, warmup_s, "learner")
            finally:
                c.limiter.stop()
        return rate
    finally:
        c.limiter.stop()


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


# --- synthetic data -------------------------------------------------------------------------------


def make_algo(config: Config, spec: EnvSpec, device: torch.device) -> Algorithm:
    """The configured algorithm, built as :func:`asyncrl.trainer.build` builds it."""
    cls = registry.get(config.algo.name)
    algo_config = registry.algo_config(cls, config.algo.params)
    torch.manual_seed(config.train.seed)
    return cls(spec, algo_config, device)


def synthetic_batch(spec: EnvSpec, data: Any, batch_size: int, device: torch.device,
                    rng: np.random.Generator, state_spec: StateSpec | None = None) -> Any:
    """A batch of the kind ``data`` asks for, with random valid contents, on ``device``
    (``state_spec``: the actor state a sequence starts from, zeros)."""
    if isinstance(data, TransitionData):
        terminal = rng.random(batch_size) < 0.01
        fields = {
            "obs": random_obs(spec, batch_size, rng),
            "actions": random_actions(spec, batch_size, rng),
            "rewards": rng.standard_normal(batch_size).astype(np.float32),
            "discounts": np.where(terminal, 0.0, data.gamma ** data.n_step).astype(np.float32),
            "next_obs": random_obs(spec, batch_size, rng),
            "weights": np.ones(batch_size, np.float32),
        }
        return TransitionBatch(**{k: torch.from_numpy(v).to(device) for k, v in fields.items()})
    if isinstance(data, TrajectoryData):
        fields, extras = synthetic_trajectories(spec, data, batch_size, rng)
        return TrajectoryBatch(**{k: torch.from_numpy(v).to(device) for k, v in fields.items()},
                               extras={k: torch.from_numpy(v).to(device) for k, v in extras.items()})
    if isinstance(data, SequenceData):
        fields, _ = synthetic_trajectories(spec, TrajectoryData(data.length, {}), batch_size, rng)
        fields["obs"] = fields["obs"][:-1]
        move = {k: torch.from_numpy(fields[k]).to(device) for k in
                ("obs", "actions", "rewards", "terminated", "truncated", "applied")}
        return SequenceBatch(**move, valid=torch.ones_like(move["applied"]),
                             state={name: torch.from_numpy(np.zeros((batch_size, *shape), dtype)).to(device)
                                    for name, (shape, dtype) in (state_spec or {}).items()},
                             weights=torch.ones(batch_size, device=device))
    raise NotImplementedError(f"bench has no synthetic batch for {type(data).__name__} yet")


def synthetic_trajectories(spec: EnvSpec, data: TrajectoryData, n: int, rng: np.random.Generator
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n`` random trajectories, time first, with a rare episode end (and its reset step)."""
    t = data.length
    terminated = rng.random((t, n)) < 0.01
    applied = np.ones((t, n), bool)
    applied[1:] = ~terminated[:-1]
    fields = {
        "obs": random_obs(spec, (t + 1) * n, rng).reshape(t + 1, n, *spec.obs_shape),
        "actions": random_actions(spec, t * n, rng).reshape(t, n, *spec.action_shape),
        "rewards": rng.standard_normal((t, n)).astype(np.float32),
        "terminated": terminated, "truncated": np.zeros((t, n), bool), "applied": applied,
        "weight_version": np.zeros(n, np.int64),
    }
    extras = {name: (-rng.random((t, n, *shape))).astype(dtype) for name, (shape, dtype) in data.extras.items()}
    return fields, extras


def _batch_size(config: Config, data: Any) -> int:
    """Items per update: PPO takes every env's trajectory at once (see trainer.build)."""
    if isinstance(data, TrajectoryData) and data.wait_for_learner:
        return config.num_streams
    return config.learner.batch_size


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


def fill_replay(replay: Replay | SequenceReplay, spec: EnvSpec, steps: int, rng: np.random.Generator) -> None:
    """About ``steps`` random steps through ``replay.insert``, one per stream per call, with a
    rare episode end (and its reset step, not applied) as an actor would insert them."""
    n = replay.num_streams
    shortest = replay.length + 2 if isinstance(replay, SequenceReplay) else replay.n_step + 2
    per_stream = min(replay.stream_capacity, max(-(-steps // n), shortest))
    streams = np.arange(n)
    # A few distinct observation blocks, reused: random Atari frames are slow to make.
    blocks = [random_obs(spec, n, rng) for _ in range(min(per_stream, 8))]
    not_truncated = np.zeros(n, bool)
    ended = np.zeros(n, bool)
    for i in range(per_stream):
        terminated = rng.random(n) < 0.01
        replay.insert(streams, blocks[i % len(blocks)], random_actions(spec, n, rng),
                      rng.standard_normal(n).astype(np.float32), terminated, not_truncated, ~ended)
        ended = terminated


def random_obs(spec: EnvSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    shape, dtype = (n, *spec.obs_shape), np.dtype(spec.obs_dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, min(int(np.iinfo(dtype).max), 255) + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def random_actions(spec: EnvSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform valid actions (an unbounded Box dimension: within [-1, 1])."""
    if spec.action_kind == "discrete":
        return rng.integers(spec.num_actions, size=n)
    low = np.where(np.isfinite(spec.action_low), spec.action_low, -1.0)
    high = np.where(np.isfinite(spec.action_high), spec.action_high, 1.0)
    return rng.uniform(low, high, size=(n, *spec.action_shape)).astype(np.float32)


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


def _act_serial(c: Components, seconds: float, warmup_s: float) -> float:
    """Serial mode's acting half: every actor in turn, in one task (Trainer._run_serial)."""
    for actor in c.actors:
        actor.env.async_reset()

    def step() -> None:
        for actor in c.actors:
            s = actor.env.recv()
            pending = actor.adder.pending(s.env_ids)
            if pending:
                c.limiter.try_insert(pending)
            actor.env.send(actor.act_batch(s), s.env_ids)

    return _timed(step, lambda: c.recorder.env_steps, seconds, warmup_s)


def _probe_spec(config: Config) -> EnvSpec:
    e = config.env
    with make_env(e.id, 1, None, config.train.seed, e.kwargs, obs_indices=e.obs_indices) as probe:
        return probe.spec


def _with(config: Config, changes: dict[str, Any]) -> Config:
    return validate(deep_merge(config.to_dict(), changes))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# --- the command line -----------------------------------------------------------------------------


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (key, values); commas inside brackets or quotes do not split
    (``algo.hidden=[64,64],[256,256]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--sweep expects KEY=V1,V2,... with a dotted key, got {text!r}")
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    if quote or depth != 0 or not all(values):
        raise ConfigError(f"--sweep {key}: expected comma-separated values, got {raw!r}")
    return key, values


def command(args: argparse.Namespace, console: Console,
            loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """``python -m asyncrl bench``: tables on ``console``, its runs in loops made by
    ``loop_factory`` (asyncio's own when None); bad input raises ConfigError."""

    def resolve_config(ns: argparse.Namespace) -> Config:
        return registry.resolve_config(ns.algo, ns.config, ns.env, ns.set)

    if not args.seconds > 0:
        raise ConfigError(f"--seconds must be > 0, got {args.seconds}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise ConfigError(f"--json: no directory {str(json_path.parent)!r}")
    # Every config is resolved (and every error found) before anything is measured.
    if args.sweep:
        key, values = parse_sweep(args.sweep)
        configs: list[tuple[str | None, Config]] = []
        for value in values:
            try:
                configs.append((value, resolve_config(argparse.Namespace(
                    **{**vars(args), "set": [*args.set, f"{key}={value}"]}))))
            except ConfigError as exc:
                raise ConfigError(f"--sweep {key}={value}: {exc}") from None
    else:
        key, configs = "", [(None, resolve_config(args))]

    def progress(name: str, repeat: int, value: float) -> None:
        mode, unit = FIGURES[name]
        console.print(f"[dim]  repeat {repeat + 1}/{args.repeats}  {mode:<17} {_fmt(value):>10} {unit}",
                      highlight=False)

    # Piped output gets rich's 80 columns, too narrow for these tables; a terminal keeps its own.
    tables = console if console.is_terminal else Console(stderr=True, width=120)
    logger = logging.getLogger("asyncrl")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the trainer's run-directory and checkpoint lines
    results = []
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            for value, config in configs:
                if value is not None:
                    console.rule(f"{key} = {value}")
                result = runner.run(bench(config, seconds=args.seconds, repeats=args.repeats,
                                          progress=progress))
                if value is not None:
                    result["sweep"] = {"key": key, "value": value}
                results.append(result)
                tables.print(render(result))
    finally:
        logger.setLevel(level)
    if args.sweep:
        tables.print(render_sweep(key, results))
    if json_path is not None:
        out = {"key": key, "values": [v for v, _ in configs], "results": results} if args.sweep else results[0]
        json_path.write_text(json.dumps(_json_safe(out), indent=2) + "\n")
        console.print(f"raw figures, medians and ratios written to {json_path}", highlight=False)
    return 0


def render(result: dict[str, Any]) -> Group:
    """One config's table: the modes' medians and spreads, then the ratios."""
    s, f, r = result["summary"], result["figures"], result["ratios"]
    actors = f"{s['num_actors']} actor{'s' if s['num_actors'] > 1 else ''}"
    env_mode = "sync" if s["batch_size"] == s["num_envs"] else "async"
    header = Text.assemble(
        ("asyncrl bench", "bold"),
        f": {s['algo']} on {s['env_id']}, {s['mode']} mode\n",
        f"device {result['device']}, placement {result['placement']}, torch threads "
        f"{result['torch_threads']}; {result['seconds']:g} s per mode after {result['warmup_s']:g} s "
        f"warm-up, "
        f"{result['repeats']} repeat{'s, interleaved' if result['repeats'] > 1 else ''}\n",
        f"env: {s['num_envs']} envs, batch {s['batch_size']} ({env_mode}), {actors}; " + (
            f"{result['inserts_per_update']:g} env steps of trajectories per update, each used once"
            + ("; acting waits for each update (policy lag 0)" if result.get("in_turns") else "")
            if s.get("on_policy") else
            f"learner batch {s['learner_batch']}, samples per insert {s['samples_per_insert']:g} "
            f"({result['inserts_per_update']:g} inserts per update)"))
    where = {"thread": "in a thread", "loop": "in the loop", "serial": "serial steps"}[result["learner_runs"]]
    what = {
        "env_ceiling": "one pool, random actions",
        "acting": f"{actors} ({result['placement']}), inference + inserts, no learner",
        "learning_ceiling": "bare algo.update on one synthetic batch",
        "learner": f"engine learner {where}, synthetic replay, no actors",
        "end_to_end_env_steps": ("Trainer" if s.get("on_policy") else
                                 f"Trainer at samples per insert {s['samples_per_insert']:g}"),
        "end_to_end_updates": "",
    }
    table = Table(show_edge=False, pad_edge=False)
    for column, justify in (("mode", "left"), ("median", "right"), ("min-max", "right"),
                            ("unit", "left"), ("what runs", "left")):
        table.add_column(column, justify=justify)
    for name, (mode, unit) in FIGURES.items():
        fig = f[name]
        table.add_row(mode, _fmt(fig["median"]), f"{_fmt(fig['min'])}-{_fmt(fig['max'])}", unit, what[name])
    bound = f"{result['slower_side']} is the slower side"
    per_pool = " (all actors over one pool)" if s["num_actors"] > 1 else ""
    ratios = Table(show_edge=False, pad_edge=False)
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_column("from the medians")
    ratios.add_row("acting / env ceiling", _fmt_ratio(r["acting_over_env_ceiling"]),
                   f"{_fmt(f['acting']['median'])} / {_fmt(f['env_ceiling']['median'])}{per_pool}")
    ratios.add_row("learner / learning ceiling", _fmt_ratio(r["learner_over_learning_ceiling"]),
                   f"{_fmt(f['learner']['median'])} / {_fmt(f['learning_ceiling']['median'])}")
    if result.get("in_turns"):  # acting and learning take turns: their series rate bounds the run
        ratios.add_row("overlap efficiency", _fmt_ratio(r["overlap_efficiency"]),
                       f"{_fmt(f['end_to_end_env_steps']['median'])} / {_fmt(result['bound_env_steps_per_s'])} "
                       f"= 1 / (1 / acting {_fmt(f['acting']['median'])} + 1 / (learner x "
                       f"{result['inserts_per_update']:g} = {_fmt(result['learner_env_steps_per_s'])})): "
                       "acting and learning take turns")
    else:
        ratios.add_row("overlap efficiency", _fmt_ratio(r["overlap_efficiency"]),
                       f"{_fmt(f['end_to_end_env_steps']['median'])} / min(acting "
                       f"{_fmt(f['acting']['median'])}, learner x {result['inserts_per_update']:g} = "
                       f"{_fmt(result['learner_env_steps_per_s'])}): {bound}")
    return Group(header, table, Text(""), ratios, Text(""))


def render_sweep(key: str, results: list[dict[str, Any]]) -> Table:
    table = Table(title=f"sweep over {key}: medians (env steps/s, updates/s) and ratios",
                  show_edge=False, pad_edge=False)
    columns = ("value", "env ceil", "acting", "learn ceil", "learner", "e2e steps", "e2e upd",
               "act/env", "lrn/ceil", "overlap")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for result in results:
        f, r = result["figures"], result["ratios"]
        table.add_row(result["sweep"]["value"], *(_fmt(f[name]["median"]) for name in FIGURES),
                      *(_fmt_ratio(r[name]) for name in RATIOS))
    return table


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj

