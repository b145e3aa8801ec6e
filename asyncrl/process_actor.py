"""Process actors: EnvPool, policy inference and the adder in a worker process
(:mod:`asyncrl.process_worker`), which writes its steps straight into the run's store in shared
memory; weights pulled from the shared-memory weight store by version. With central inference
(:mod:`asyncrl.inference`) the worker holds no network: it asks the loop's inference task for each
batch's actions. This module is the loop's side: it starts and owns the worker, hands its
requests on, and publishes what it wrote.

The worker owns ``slots`` slots. For each batch it takes a free slot, acts, sends the actions,
runs the adder over its writer (:mod:`asyncrl.writers`: the steps land in the replay's stream
rings ahead of publication, or finished trajectories in the slot), and sends the loop one
message: the slot, how many items it wrote, its env steps and ended episodes. The loop waits for
room under the gate (rate limiter or rollout queue), publishes the items in one call, counts,
and hands the slot back: a fixed handful of calls per batch. When every slot is in flight the
worker waits, so the gate throttles acting as it does for inline actors. A worker that dies is
reported in one line, never waited on; once the run is stopping (its limiter stopped) a worker's
end is no failure: the final checkpoint saves what the loop published.

Start-up: the worker says hello as soon as it runs (a worker that dies or hangs before that never
got past importing the main module: the actor refuses to start, naming the ``__main__`` guard),
makes its env and network, then waits for the start message that ``run`` sends with the trainer's
env-step count and, on resume, its RNG state. Signals are the parent's: a worker ignores SIGINT
and SIGTERM (a terminal's Ctrl-C and GNU ``timeout`` signal the whole process group) and exits
when told to, or when its parent is gone."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import time
from typing import Any, Callable

import numpy as np
import torch.multiprocessing as mp

from asyncrl.acting import pack_rng_state, unpack_rng_state
from asyncrl.actor import ActorBase
from asyncrl.adders import Adder
from asyncrl.episodes import Counted
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.inference import CentralInference
from asyncrl.process_worker import (ANSWERED, ENV_STEPS, FAILED, READY, REQUEST, START, STOP, STOPPING,
                                    TAKEN, UNGUARDED_MAIN, WAKE, WORKER_NAME, ZERO_NONFINITE, Slots,
                                    refuse_inside_a_worker, run_worker)
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.shm import shared_zeros
from asyncrl.weights import WeightStore
from asyncrl.writers import writer_for

log = logging.getLogger("asyncrl")

# From a worker's start to its hello: unpickling and importing the main module, milliseconds from a
# fork server for a guarded script. Far longer means its import never ends.
_HELLO_TIMEOUT_S = 120.0
_ENDED = object()  # in an actor's queue: the run ended on a batch taken in the reader's callback


class ActorDied(RuntimeError):
    pass


def _context():
    """Where workers start from: a fork server that has imported this module (torch), EnvPool and
    torch._dynamo once, so every later worker of the process starts in milliseconds instead of
    seconds of imports; plain spawn where fork servers do not exist (Windows). The engine imports
    EnvPool lazily, and torch imports torch._dynamo at the first optimizer an algorithm builds
    (~1.5 s here each): a worker forked from a server without them pays both. The server also
    imports ``asyncrl._forkserver``, which keeps it alive through a SIGTERM sent to the process
    group: the loop learns its workers' exit codes from it."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "asyncrl._forkserver", "envpool", "torch._dynamo"])
    return ctx


def start_fork_server() -> None:
    """Start the fork server now (if not running yet), so that its imports overlap whatever the
    caller does before the first worker starts; a no-op where workers are spawned."""
    refuse_inside_a_worker()
    if "forkserver" in mp.get_all_start_methods():
        _context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


class ProcessActor(ActorBase):
    """The loop's side of a process actor: starts and owns the worker, publishes what it wrote.

    ``data`` is the run's store (a shared-memory replay, or the rollout queue) and
    ``make_adder`` makes the worker's adder over its writer; the actor's envs are the store's
    streams ``first_stream ...``. The worker holds ``slots`` batches in flight at most: a
    replay must let writers run that far ahead (``writers_ahead``). With ``inference`` (central
    inference) the worker holds no network: ``inference`` acts on its batches, and holds the
    exploration RNG."""

    def __init__(self, index: int, make_env_args: dict[str, Any], algo_name: str,
                 algo_params: dict[str, Any], store: WeightStore, data: Any,
                 make_adder: Callable[[Any], Adder], first_stream: int, recorder: Recorder,
                 seed: int, pull_every: int, slots: int, inference: CentralInference | None = None):
        refuse_inside_a_worker()
        num_envs = make_env_args["num_envs"]
        super().__init__(num_envs, store, None, recorder)
        self.index = index
        batch = make_env_args.get("batch_size") or num_envs
        self._streams = first_stream + np.arange(num_envs)
        self._first_stream, self._inference = first_stream, inference
        self._requests = inference.requests(batch) if inference is not None else None
        self._writer = writer_for(data, slots, batch)
        self._slots = Slots(slots, batch)
        self._views = self._slots.views()
        self._control = shared_zeros((4,), np.dtype(np.int64))
        # The worker's RNG as of the last batch ingested (it draws as it acts): until the first,
        # the state it starts from.
        self._rng = pack_rng_state(np.random.default_rng([seed, index]).bit_generator.state)
        self._rng_set = False
        self._started = False
        self._conn, child_conn = mp.Pipe()
        self._process = _context().Process(
            target=run_worker, name=f"{WORKER_NAME}{index}", daemon=True,
            args=(index, make_env_args, algo_name, algo_params, store, self._writer, make_adder,
                  self._slots, self._control, child_conn, seed, pull_every, self._requests))
        self._process.start()
        child_conn.close()
        try:
            self._await_hello()
        except BaseException:
            self.close()
            raise

    def _await_hello(self) -> None:
        """Return once the worker runs this module's code; raise one line if it died or hung
        before that, i.e. while it imported the main module."""
        if self._conn.poll(_HELLO_TIMEOUT_S):
            try:
                self._conn.recv_bytes()
                return
            except EOFError:  # its end closed: it died
                pass
        self._process.join(timeout=1)
        code = self._process.exitcode
        main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
        guard = (f'guard the entry point of {main} with `if __name__ == "__main__":` (worker '
                 "processes import the main module, and must not start training as they do)")
        if code == UNGUARDED_MAIN:
            raise RunError(f"actor {self.index}'s worker process re-ran {main} as it imported it "
                           f"and started a run there: {guard}")
        if code is None:
            raise RunError(f"actor {self.index}'s worker process (pid {self._process.pid}) did not "
                           f"start within {_HELLO_TIMEOUT_S:.0f} s, still importing {main}: {guard}")
        raise RunError(f"actor {self.index}'s worker process (pid {self._process.pid}) died while "
                       f"importing {main} (exit code {code}; its error is above): if that script "
                       f"trains at import, {guard}")

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def rng_state(self) -> dict:
        """The worker's exploration RNG state as plain (JSON-able) data, as of the last batch
        the loop ingested (the worker may have drawn for the batches in flight since); with
        central inference, the central policy step's (every actor's exploration)."""
        if self._inference is not None:
            return self._inference.policy.rng_state()
        return unpack_rng_state(self._rng)

    def set_rng_state(self, state: dict) -> None:
        """The state the worker's RNG starts from; before :meth:`run`, which sends it."""
        if self._started:
            raise RuntimeError("set_rng_state must come before run(): the worker is acting")
        if self._inference is not None:
            self._inference.policy.set_rng_state(state)
            return
        self._rng = pack_rng_state(state)
        self._rng_set = True

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[Any] = asyncio.Queue()  # records; None: the worker's end; _ENDED; an error
        fd, size, pending = self._conn.fileno(), READY.size, b""
        inference, requests, first = self._inference, self._requests, self._first_stream
        answered = struct.pack("<i", ANSWERED)

        def reply() -> None:
            self._send(answered)

        busy = ended = False  # the task holds a record (waiting at the gate); the run has ended

        def take_now(record: tuple) -> bool:
            """A batch taken in the reader's callback, without the hand-off to this task (a
            queue put, a task wake-up and a get: a third of the loop's work per batch), when
            nothing is ahead of it and the gate has room now. Failures and the end of the run
            still reach the task, through the queue."""
            nonlocal ended
            if ended or busy or not ready.empty() or record[0] == FAILED or limiter.stopped:
                return ended
            try:
                if record[5] and not limiter.try_insert(record[5]):
                    return False
                self._ingest(record, ctl, timer, v, 0.0)
                if on_steps():
                    ended = True
                    ready.put_nowait(_ENDED)
            except BaseException as exc:  # noqa: BLE001 - raised in the task, not the loop's handler
                ended = True
                ready.put_nowait(exc)
            return True

        def on_readable() -> None:
            # The pipe's end closes only when the worker exits, however it exits: a reliable
            # death notice (unlike the process sentinel, which a fork server killed by a
            # group-wide signal would fire for every worker).
            nonlocal pending
            try:
                data = os.read(fd, 1 << 16)  # every record waiting, in one call
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                ready.put_nowait(None)
                return
            pending += data
            whole = len(pending) - len(pending) % size
            for record in READY.iter_unpack(pending[:whole]):
                if record[0] == REQUEST:  # to the inference task at once, even while a batch waits at the gate
                    inference.ask(requests, first, record[5], reply)
                elif not take_now(record):
                    ready.put_nowait(record)
            pending = pending[whole:]

        # The worker writes from the store's heads as they are now (a resumed run's) and reads
        # the env-step count from the control tensor before its first action.
        self._writer.open(self._streams)
        ctl = self._control.numpy()
        ctl[ENV_STEPS] = self.recorder.env_steps
        ctl[ZERO_NONFINITE] = self.nonfinite == "zero"
        self._started = True
        self._send(struct.pack("<i", START) + (self._rng.tobytes() if self._rng_set else b""))
        timer, v = self.recorder.timer, self._views
        loop.add_reader(fd, on_readable)
        try:
            while True:
                record = await ready.get()
                if record is _ENDED:
                    return
                if isinstance(record, BaseException):
                    raise record
                if record is None:
                    if limiter.stopped:  # the run is ending: what the worker did no longer matters
                        return
                    self._process.join(timeout=1)
                    raise ActorDied(f"actor {self.index} (pid {self._process.pid}) died "
                                    f"with exit code {self._process.exitcode}")
                busy = True
                await self._take(record, limiter, ctl, timer, v)
                busy = False
                if on_steps():
                    ended = True
                    return
        except LimiterStopped:
            return
        finally:
            loop.remove_reader(fd)
            if inference is not None:
                inference.actor_done()

    async def _take(self, record: tuple, limiter: RateLimiter, ctl: np.ndarray, timer, v) -> None:
        """One batch the worker wrote: room under the gate, publish, count, give its slot back."""
        slot, version, env_wait, inference, slot_wait, written, steps, ended, zeroed, full = record
        if slot == FAILED:
            raise RunError(bytes(v["error"]).rstrip(b"\0").decode(errors="replace"))
        t0 = time.perf_counter()
        if written:
            await limiter.await_insert(written)
        self._ingest(record, ctl, timer, v, time.perf_counter() - t0)

    def _ingest(self, record: tuple, ctl: np.ndarray, timer, v, insert_wait: float) -> None:
        """A batch through the gate: publish what it wrote, count it, give its slot back."""
        slot, version, env_wait, inference, slot_wait, written, steps, ended, zeroed, full = record
        t1 = time.perf_counter()
        if written:
            self._writer.publish(slot, written)
        if ended:
            self.count(Counted(steps, v["returns"][slot, :ended], v["lengths"][slot, :ended]))
        else:
            self.recorder.env_steps += steps
        if zeroed:
            self.count_nonfinite(zeroed)
        self.weight_version = version
        if self._inference is None:
            self._rng = v["rng"][slot].copy()
        ctl[TAKEN] += 1
        ctl[ENV_STEPS] = self.recorder.env_steps
        if full:  # it waits for a slot: this one
            self._send(struct.pack("<i", WAKE))
        timer.add("insert_wait", insert_wait)
        timer.add("insert", time.perf_counter() - t1)
        timer.add("actor_env_wait", env_wait)
        timer.add("actor_inference", inference)
        timer.add("actor_slot_wait", slot_wait)

    def _send(self, message: bytes) -> None:
        try:
            self._conn.send_bytes(message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone: the reader's end-of-file says so, then how it ended

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop and join it; kill it only if it does not stop in time."""
        self._control[STOPPING] = 1
        try:
            self._conn.send_bytes(struct.pack("<i", STOP))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("actor %d did not stop within %.0f s; killing it", self.index, timeout)
            self._process.kill()
            self._process.join()
        self._conn.close()
