"""The trainer: one task group that owns every part :func:`asyncrl.wiring.build` makes (actors, the
learner) and schedules evaluations and checkpoints (:mod:`asyncrl.runstate` takes and restores
the state they hold). ``Trainer.run()`` is awaited in the caller's event loop;
``Trainer.stop()`` ends the run cleanly (final evaluation and checkpoint); cancelling the task
that awaits ``run()`` ends it too, with the same cleanup."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from asyncrl import checkpoint, registry, runstate
from asyncrl.actor import Actor
from asyncrl.config import EVAL_SEED_OFFSET, Config, ConfigError
from asyncrl.core import acting_copy
from asyncrl.envs import VecEnv, make_env
from asyncrl.evaluation import evaluate
from asyncrl.faults import RunError
from asyncrl.learner import QueueDraw, run_to_completion
from asyncrl.metrics import JsonlSink, Recorder, Sink, TensorBoardSink, truncate_jsonl
from asyncrl.policy import LivePolicy, Policy
from asyncrl.stream import MetricStream
from asyncrl.wiring import Components, build, default_run_dir

__all__ = ["Trainer", "Components", "build"]

log = logging.getLogger("asyncrl")


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
                # Several tasks may fail at once (every actor's worker at one timeout): the
                # first one's line tells it.
                if all(isinstance(exc, (RunError, ConfigError)) for exc in group.exceptions):
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
        self._replay_every = runstate.replay_checkpoint_every(c)
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

        def learn() -> bool:  # one update where the limiter allows one (the actor waits for room)
            if not c.limiter.try_sample(batch):
                return False
            c.learner.step()
            return True

        for actor in c.actors:
            actor.env.async_reset()
        while not self._stopping:
            for actor in c.actors:
                actor.step_now(c.limiter, learn)
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
        """What the next checkpoint holds; the replay with every ``replay_every``-th."""
        due = bool(self._replay_every) and self._ckpts_since_replay + 1 >= self._replay_every
        return runstate.snapshot(self.c, with_replay=due)

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
        """``accept`` of :func:`checkpoint.load_latest`: raises when the checkpoint does not fit."""
        self._restored_replay = runstate.restore(self.c, path, manifest, state, bool(self._replay_every))

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
            **({"policy_lag": c.learner.draw.policy_lag} if isinstance(c.learner.draw, QueueDraw) else {}),
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
