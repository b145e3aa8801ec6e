"""Process actors: EnvPool, policy inference and the adder in a worker process, which writes
its steps straight into the run's store in shared memory; weights pulled from the shared-memory
weight store by version.

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
import multiprocessing.connection as mpc
import os
import signal
import struct
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.multiprocessing as mp

from asyncrl.acting import RNG_WORDS, PolicyStep, pack_rng_state, unpack_rng_state
from asyncrl.actor import ActorBase
from asyncrl.adders import Adder
from asyncrl.episodes import Counted, Episodes, check_finite
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.shm import shared_zeros
from asyncrl.weights import WeightStore
from asyncrl.writers import StreamWriter, TrajectorySink, writer_for

log = logging.getLogger("asyncrl")

# Worker -> loop, after the hello: one fixed-size record per batch, written raw to the pipe (one
# write, atomic; the loop reads every record waiting in one read). A batch's slot, weight
# version, seconds in env wait, inference and slot wait, items written (for the gate), real env
# steps, episodes ended, steps whose inf/nan became 0, and whether the worker's slots are all in
# flight (it then waits for a wake-up). Slot -1: the run must stop, for the reason in ``error``.
_READY = struct.Struct("<iqdddiiiii")
_FAILED = -1
# Loop -> worker, framed messages: start (may carry RNG words), stop, and wake-ups.
_STOP, _START, _WAKE = -1, -2, -3
# Entries of the shared control tensor: the trainer's env steps, stop, nonfinite = "zero", and
# batches the loop has taken in (slots come back in order, so a count says which are free).
_ENV_STEPS, _STOPPING, _ZERO_NONFINITE, _TAKEN = 0, 1, 2, 3
_WORKER_NAME = "asyncrl-actor-"
# A worker's exit code when it finds itself re-running the main script and starting a run.
_UNGUARDED_MAIN = 87
# From a worker's start to its hello: unpickling and importing the main module, milliseconds from a
# fork server for a guarded script. Far longer means its import never ends.
_HELLO_TIMEOUT_S = 120.0
_PARENT_CHECK_S = 1.0  # how long a worker waits on a stuck publish before it checks its parent
SLOTS = 4  # batches a worker may have written that the loop has not published yet


class ActorDied(RuntimeError):
    pass


class _ParentGone(Exception):
    pass


def _refuse_inside_a_worker() -> None:
    """A worker that starts a run is re-running an unguarded main script as it imports it (the
    fork server and spawn import the main module in each worker): it can never become a worker.
    Exit at once with a code the parent recognises, rather than let the script go on (a host's
    server or loop would keep the worker from ever starting, and its parent waiting)."""
    if mp.current_process().name.startswith(_WORKER_NAME):
        sys.stderr.flush()
        os._exit(_UNGUARDED_MAIN)


class _Slots:
    """What the worker says of each batch beside the message: its RNG state after the batch,
    and the return and length of every episode that ended in it."""

    def __init__(self, slots: int, batch: int):
        self.rng = shared_zeros((slots, RNG_WORDS), np.dtype(np.int64))
        self.returns = shared_zeros((slots, batch), np.dtype(np.float64))
        self.lengths = shared_zeros((slots, batch), np.dtype(np.int64))
        self.error = shared_zeros((4096,), np.dtype(np.uint8))  # why the run must stop (UTF-8)

    def views(self) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in vars(self).items()}


def _worker(index: int, make_env_args: dict[str, Any], algo_name: str, algo_params: dict[str, Any],
            store: WeightStore, writer: StreamWriter | TrajectorySink, make_adder: Callable[[Any], Adder],
            slots: _Slots, control: torch.Tensor, conn: mpc.Connection, seed: int, pull_every: int) -> None:
    """The worker process: receive, pull weights, act, send; write each batch into the store
    through ``writer`` and tell the loop what it wrote, in a slot."""
    # Signals are the parent's to handle: Ctrl-C in a terminal and GNU timeout signal the whole
    # process group, and a worker that ended on them would read as a dead actor. The parent
    # stops us with a message (or kills us); a parent that is gone closes our pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    env = None
    try:
        conn.send_bytes(b"")  # hello: the main module imported, this process can act
        torch.set_num_threads(1)  # one thread is fastest for acting networks here (BENCHMARKS.md)
        from asyncrl import registry
        from asyncrl.envs import make_env

        parent = mp.parent_process()
        env = make_env(**make_env_args)
        cls = registry.get(algo_name)
        algo = cls(env.spec, registry.algo_config(cls, algo_params), torch.device("cpu"))
        policy = PolicyStep(algo, env.num_envs, np.random.default_rng([seed, index]), store=store,
                            pull_every=pull_every, pull_timeout=_PARENT_CHECK_S,
                            on_stuck_publish=lambda: _check_parent(parent))
        views, ctl = slots.views(), control.numpy()
        num_slots, sent, fd = len(views["rng"]), 0, conn.fileno()
        episodes = Episodes(env.num_envs)
        # Made ready (env, network) while the loop starts; act only once it says so, with the
        # RNG state it may send and its env-step count in the control tensor; write from the
        # store's heads as they are then (a resumed run's).
        start = conn.recv_bytes()
        if struct.unpack_from("<i", start)[0] != _START:
            return
        if len(start) > 4:
            policy.set_rng_state(unpack_rng_state(np.frombuffer(start, np.int64, offset=4)))
        nonfinite = "zero" if ctl[_ZERO_NONFINITE] else "stop"
        writer.attach()
        adder = make_adder(writer)
        env.async_reset()
        while not ctl[_STOPPING]:
            t0 = time.perf_counter()
            step = env.recv()
            t1 = time.perf_counter()
            while sent - ctl[_TAKEN] >= num_slots:  # every slot in flight: wait to be woken
                if conn.poll(0.1):
                    if struct.unpack("<i", conn.recv_bytes())[0] == _STOP:
                        return
                elif ctl[_STOPPING]:
                    return
            t2 = time.perf_counter()
            try:
                zeroed = check_finite(step, nonfinite, make_env_args["env_id"], int(ctl[_ENV_STEPS]))
            except RunError as exc:
                text = str(exc).encode()[:len(views["error"])]
                views["error"][:len(text)] = np.frombuffer(text, np.uint8)
                os.write(fd, _READY.pack(_FAILED, 0, 0, 0, 0, 0, 0, 0, 0, 0))
                return
            acted = policy.act(step.obs, step.env_ids, int(ctl[_ENV_STEPS]), step.terminated, step.truncated)
            env.send(acted.actions, step.env_ids)  # the envs step while the batch is written
            t3 = time.perf_counter()
            slot = sent % num_slots
            writer.begin(slot)
            counted = episodes.count(step)
            adder.observe(step.env_ids, step.obs, step.rewards, step.terminated, step.truncated)
            adder.record_actions(step.env_ids, acted)
            ended = len(counted.returns)
            views["returns"][slot, :ended] = counted.returns
            views["lengths"][slot, :ended] = counted.lengths
            views["rng"][slot] = pack_rng_state(policy.rng_state())
            sent += 1
            os.write(fd, _READY.pack(slot, acted.weight_version, t1 - t0, t3 - t2, t2 - t1, writer.finish(),
                                     counted.steps, ended, zeroed, int(sent - ctl[_TAKEN] >= num_slots)))
    except (EOFError, BrokenPipeError, ConnectionResetError, _ParentGone):
        pass  # the parent is gone (or closed our pipe): nobody is left to hand batches to
    finally:
        if env is not None:
            env.close()


def _check_parent(parent) -> None:
    """Give up a pull that waits out a publish in progress once the parent is gone (a parent
    killed mid-publish leaves it in progress for good); while it lives, the pull waits on."""
    if parent is not None and not parent.is_alive():
        raise _ParentGone


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
    _refuse_inside_a_worker()
    if "forkserver" in mp.get_all_start_methods():
        _context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


class ProcessActor(ActorBase):
    """The loop's side of a process actor: starts and owns the worker, publishes what it wrote.

    ``data`` is the run's store (a shared-memory replay, or the rollout queue) and
    ``make_adder`` makes the worker's adder over its writer; the actor's envs are the store's
    streams ``first_stream ...``. The worker holds ``slots`` batches in flight at most: a
    replay must let writers run that far ahead (``writers_ahead``)."""

    def __init__(self, index: int, make_env_args: dict[str, Any], algo_name: str,
                 algo_params: dict[str, Any], store: WeightStore, data: Any,
                 make_adder: Callable[[Any], Adder], first_stream: int, recorder: Recorder,
                 seed: int, pull_every: int, slots: int = SLOTS):
        _refuse_inside_a_worker()
        num_envs = make_env_args["num_envs"]
        super().__init__(num_envs, store, None, recorder)
        self.index = index
        batch = make_env_args.get("batch_size") or num_envs
        self._streams = first_stream + np.arange(num_envs)
        self._writer = writer_for(data, slots, batch)
        self._slots = _Slots(slots, batch)
        self._views = self._slots.views()
        self._control = shared_zeros((4,), np.dtype(np.int64))
        # The worker's RNG as of the last batch ingested (it draws as it acts): until the first,
        # the state it starts from.
        self._rng = pack_rng_state(np.random.default_rng([seed, index]).bit_generator.state)
        self._rng_set = False
        self._started = False
        self._conn, child_conn = mp.Pipe()
        self._process = _context().Process(
            target=_worker, name=f"{_WORKER_NAME}{index}", daemon=True,
            args=(index, make_env_args, algo_name, algo_params, store, self._writer, make_adder,
                  self._slots, self._control, child_conn, seed, pull_every))
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
        if code == _UNGUARDED_MAIN:
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
        the loop ingested (the worker may have drawn for the batches in flight since)."""
        return unpack_rng_state(self._rng)

    def set_rng_state(self, state: dict) -> None:
        """The state the worker's RNG starts from; before :meth:`run`, which sends it."""
        if self._started:
            raise RuntimeError("set_rng_state must come before run(): the worker is acting")
        self._rng = pack_rng_state(state)
        self._rng_set = True

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[bytes | None] = asyncio.Queue()
        fd = self._conn.fileno()

        def on_readable() -> None:
            # The pipe's end closes only when the worker exits, however it exits: a reliable
            # death notice (unlike the process sentinel, which a fork server killed by a
            # group-wide signal would fire for every worker).
            try:
                data = os.read(fd, 1 << 16)  # every record waiting, in one call
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
            ready.put_nowait(data or None)

        # The worker writes from the store's heads as they are now (a resumed run's) and reads
        # the env-step count from the control tensor before its first action.
        self._writer.open(self._streams)
        ctl = self._control.numpy()
        ctl[_ENV_STEPS] = self.recorder.env_steps
        ctl[_ZERO_NONFINITE] = self.nonfinite == "zero"
        self._started = True
        self._send(struct.pack("<i", _START) + (self._rng.tobytes() if self._rng_set else b""))
        loop.add_reader(fd, on_readable)
        timer, v, size, pending = self.recorder.timer, self._views, _READY.size, b""
        try:
            while True:
                data = await ready.get()
                if data is None:
                    if limiter.stopped:  # the run is ending: what the worker did no longer matters
                        return
                    self._process.join(timeout=1)
                    raise ActorDied(f"actor {self.index} (pid {self._process.pid}) died "
                                    f"with exit code {self._process.exitcode}")
                pending += data
                whole = len(pending) - len(pending) % size
                for record in _READY.iter_unpack(pending[:whole]):
                    await self._take(record, limiter, ctl, timer, v)
                    if on_steps():
                        return
                pending = pending[whole:]
        except LimiterStopped:
            return
        finally:
            loop.remove_reader(fd)

    async def _take(self, record: tuple, limiter: RateLimiter, ctl: np.ndarray, timer, v) -> None:
        """One batch the worker wrote: room under the gate, publish, count, give its slot back."""
        slot, version, env_wait, inference, slot_wait, written, steps, ended, zeroed, full = record
        if slot == _FAILED:
            raise RunError(bytes(v["error"]).rstrip(b"\0").decode(errors="replace"))
        t0 = time.perf_counter()
        if written:
            await limiter.await_insert(written)
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
        self._rng = v["rng"][slot].copy()
        ctl[_TAKEN] += 1
        ctl[_ENV_STEPS] = self.recorder.env_steps
        if full:  # it waits for a slot: this one
            self._send(struct.pack("<i", _WAKE))
        timer.add("insert_wait", t1 - t0)
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
        self._control[_STOPPING] = 1
        try:
            self._conn.send_bytes(struct.pack("<i", _STOP))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("actor %d did not stop within %.0f s; killing it", self.index, timeout)
            self._process.kill()
            self._process.join()
        self._conn.close()
