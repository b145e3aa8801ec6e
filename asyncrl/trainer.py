"""The trainer: one task group that owns every part :func:`asyncrl.wiring.build` makes (actors, the
learner) and schedules evaluations (:mod:`asyncrl.evaluator`) and checkpoints
(:mod:`asyncrl.runstate`). ``Trainer.run()`` is awaited in the caller's event loop;
``Trainer.stop()`` ends the run cleanly (final evaluation and checkpoint); cancelling the task
that awaits ``run()`` ends it too, with the same cleanup."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo  # noqa: F401 (imported with this module, as EnvPool is below)

from asyncrl import datasets, registry, runstate
from asyncrl.actor import Actor
from asyncrl.config import Config, ConfigError
from asyncrl.draws import QueueDraw
from asyncrl.envs_envpool import envpool_module
from asyncrl.evaluator import Evaluator
from asyncrl.faults import RunError
from asyncrl.learner import device_line, pick_device, run_to_completion
from asyncrl.metrics import Recorder, Sink
from asyncrl.policy import LivePolicy, Policy
from asyncrl.stream import MetricStream
from asyncrl.wiring import Components, build, default_run_dir

__all__ = ["Trainer", "Components", "build"]

log = logging.getLogger("asyncrl")

# What every run imports, imported with this module instead: before a host's event loop runs
# (``from asyncrl import Trainer``), not by run() on its I/O thread, where unmarshalling these
# modules and initialising their C extensions hold the GIL for up to ~200 ms at a time (the
# host's loop waited that long, three times per start). make_env asks EnvPool's catalogue;
# torch.optim's first step imports torch._dynamo (sympy and torch.distributed with it). Seconds,
# which every run pays anyway; the CLI imports this module only to run.
envpool_module()


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
        self._evals: Evaluator | None = None
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
            self._eval_due, self._ckpt_due = asyncio.Event(), asyncio.Event()
            log.info("run directory %s", self.run_dir)
            log.info("%s", device_line(c.config.learner.device, pick_device(c.config.learner.device)))
            try:
                if recorder.env_steps < t.total_env_steps:
                    await (self._run_serial() if t.mode == "serial" else self._run_async())
            except asyncio.CancelledError:
                # Every task has ended (the task group waited for them): the state is consistent.
                try:
                    await self._off_loop(self._ckpts.final)
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
        directory (:func:`asyncrl.runstate.open_run_dir`)."""
        t = self.config.train
        if not self.resume:
            runstate.refuse_used_run_dir(self.run_dir)
        # Envs and networks first: a bad env id or config leaves no run directory behind.
        self.c = c = build(self.config, recorder, self._env_fn)
        self._evals = Evaluator(c, self._env_fn)
        self._ckpts = runstate.Checkpoints(c, self.run_dir / "checkpoints")
        if t.record_dataset is not None:  # before the run directory, and before minutes of training
            datasets.check_recordable(t.record_dataset, c.replay, str(self.run_dir.resolve()))
        restored = self._ckpts.resume() if self.resume else None
        runstate.open_run_dir(self.run_dir, c, bool(restored), self._extra_sinks)
        if restored:
            log.info("resumed from %s at %d env steps%s", restored[0], recorder.env_steps,
                     "" if self._ckpts.restored_replay else " (the checkpoint holds no replay: it fills anew)")

    # --- the two modes -----------------------------------------------------------------------

    async def _run_async(self) -> None:
        c = self.c
        async with asyncio.TaskGroup() as tg:
            for actor in c.actors:
                tg.create_task(actor.run(c.limiter, self._on_steps))
            if c.inference is not None:  # acts for every process actor, until their runs end
                tg.create_task(c.inference.run())
            # In a thread beside inline actors; and in an offline run, where no actor shares the
            # process: its chunks then hold max_updates_per_call updates, not a loop slice's few.
            in_thread = isinstance(c.actors[0], Actor) or self.config.replay.dataset is not None
            tg.create_task(c.learner.run(in_thread=in_thread))
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
            actor.reset_envs()
        while not self._stopping:
            for actor in c.actors:
                actor.step_now(c.limiter, learn)
                done = self._on_steps()
                while c.limiter.try_sample(batch):
                    c.learner.step()
                if self._eval_due.is_set():
                    self._eval_due.clear()
                    self._check_target(self._evals.now())
                if self._ckpt_due.is_set():
                    self._ckpt_due.clear()
                    self._ckpts.save_now()
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
            # With a target return, the weights evaluated are the ones kept if the run stops on
            # them: learning goes on meanwhile, from a kept copy of the state evaluated, restored
            # if so (a data-parallel group's state lives in its ranks: learning pauses instead).
            learner, target = self.c.learner, self.config.train.target_return
            keep = target is not None and learner.restorable
            async with learner.lock if target is not None and not keep else nullcontext():
                async with learner.lock if keep else nullcontext():
                    kept = learner.keep() if keep else None
                    network, version = self._evals.pull()
                returns = await self._off_loop(self._evals.returns, network)
                row = self._evals.record(returns, version)
            back = kept is not None and row["eval/return_mean"] >= target
            async with learner.lock if back else nullcontext():  # stopping stops the gate first
                if back:
                    self._evals.last_version = learner.restore(kept)
                self._check_target(row)

    async def _checkpointer(self) -> None:
        while True:
            await self._ckpt_due.wait()
            self._ckpt_due.clear()
            if self._stopping:
                return
            async with self.c.learner.lock:  # no update in flight: a consistent state
                snapshot = self._ckpts.snapshot()
            await self._off_loop(self._ckpts.save, *snapshot)

    def _check_target(self, row: dict[str, Any]) -> None:
        """Stop the run once an evaluation reached ``train.target_return``."""
        target = self.config.train.target_return
        if target is not None and row["eval/return_mean"] >= target:
            log.info("evaluation reached the target return %.1f: stopping", target)
            self.result["reached_target_at"] = self.c.recorder.env_steps
            self.stop()

    def _finish_sync(self) -> None:
        """After the tasks ended: a last evaluation and the final checkpoint."""
        rec = self.c.recorder
        if self.config.replay.dataset is not None:  # an offline run's steps are its updates: the
            rec.env_steps = rec.updates  # learner thread's last chunk may end after the clock's last tick
        self.result["train_wall_s"] = rec.wall_s  # training alone, before the final eval and save
        if self._evals.last_version != self.c.store.version and rec.env_steps > 0:
            self._check_target(self._evals.now())  # the final policy has not been evaluated yet
        self._ckpts.final()
        rec.log_row()
        dataset_id = self.config.train.record_dataset
        if dataset_id is not None:
            stats = datasets.record_replay(dataset_id, self.c.replay, self.c.spec, self.config.algo.name,
                                           str(self.run_dir.resolve()))
            log.info("recorded %d episodes (%d steps, mean return %.1f) into dataset %s", stats["episodes"],
                     stats["steps"], stats["return_mean"], dataset_id)
            self.result["dataset"] = {"id": dataset_id, **stats}
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
            self.c.learner.close()  # data-parallel learners' processes
            for actor in self.c.actors:
                actor.close()
            if self.c.remote is not None:
                self.c.remote.close()
            self.c.recorder.close()
        if self._evals is not None:
            self._evals.close()

def _stop_iteration_raised(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, a StopIteration from it (an exhausted iterator in a user's env factory)
    raised as a RuntimeError: a future cannot carry a StopIteration, and its awaiter would wait
    for ever."""
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"StopIteration escaped from {getattr(fn, '__qualname__', fn)}") from exc
