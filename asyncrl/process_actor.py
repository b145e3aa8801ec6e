"""Process actors: EnvPool and policy inference in a worker process, finished batches handed to
the loop through shared-memory slabs (no pickling per step), weights pulled from the shared-memory
weight store by version.

The worker owns ``slabs`` slots of one batch each. It writes a batch (the observations it
received, what the env returned with them, the actions it chose) into a free slot and sends the
slot's number over a pipe; the loop ingests the slot into the replay under the rate limiter and
sends the number back. When every slot is full the worker waits, so the limiter throttles acting
as it does for inline actors. A worker that dies is reported in one line, never waited on;
once the run is stopping (its limiter stopped) a worker's end is no failure: the final checkpoint
saves the loop's state, which holds every batch taken in.

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
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from asyncrl.acting import Acted, PolicyStep
from asyncrl.actor import ActorBase
from asyncrl.adders import Adder
from asyncrl.core import EnvSpec, StateSpec
from asyncrl.envs import Step
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")

_READY = struct.Struct("<iqddd")  # slot, weight version, seconds in env wait, inference, slot wait
_STOP, _START = -1, -2  # loop -> worker messages besides slot numbers; _START may carry RNG words
_ENV_STEPS, _STOPPING = 0, 1  # entries of the shared control tensor
_WORKER_NAME = "asyncrl-actor-"
# A worker's exit code when it finds itself re-running the main script and starting a run.
_UNGUARDED_MAIN = 87
# From a worker's start to its hello: unpickling and importing the main module, milliseconds from a
# fork server for a guarded script. Far longer means its import never ends.
_HELLO_TIMEOUT_S = 120.0
_PARENT_CHECK_S = 1.0  # how long a worker waits on a stuck publish before it checks its parent


class ActorDied(RuntimeError):
    pass


class _ParentGone(Exception):
    pass


_RNG_WORDS = 6
_MASK64 = (1 << 64) - 1


def pack_rng_state(state: dict) -> np.ndarray:
    """A PCG64 state (what ``default_rng`` makes) as six int64 words, the form in which a worker's
    RNG state travels (start message, slots, a remote actor's results): the 128-bit state and
    increment in 64-bit halves, then the buffered 32-bit draw."""
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"a process actor's RNG is a PCG64, not {state.get('bit_generator')!r}")
    s, inc = state["state"]["state"], state["state"]["inc"]
    return np.array([s & _MASK64, s >> 64, inc & _MASK64, inc >> 64, state["has_uint32"],
                     state["uinteger"]], np.uint64).view(np.int64)


def unpack_rng_state(words: np.ndarray) -> dict:
    """The state dict (``bit_generator.state``) that :func:`pack_rng_state` packed."""
    w = [int(x) for x in np.asarray(words, np.int64).view(np.uint64)]
    return {"bit_generator": "PCG64", "state": {"state": w[0] | w[1] << 64, "inc": w[2] | w[3] << 64},
            "has_uint32": w[4], "uinteger": w[5]}


def _refuse_inside_a_worker() -> None:
    """A worker that starts a run is re-running an unguarded main script as it imports it (the
    fork server and spawn import the main module in each worker): it can never become a worker.
    Exit at once with a code the parent recognises, rather than let the script go on (a host's
    server or loop would keep the worker from ever starting, and its parent waiting)."""
    if mp.current_process().name.startswith(_WORKER_NAME):
        sys.stderr.flush()
        os._exit(_UNGUARDED_MAIN)


def _shared(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    return torch.from_numpy(np.zeros(shape, dtype)).share_memory_()


class _Slabs:
    """``slots`` batches of one actor, in shared memory."""

    def __init__(self, slots: int, batch: int, spec: EnvSpec,
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                 state_spec: StateSpec | None = None):
        self.obs = _shared((slots, batch, *spec.obs_shape), spec.obs_dtype)
        self.rewards = _shared((slots, batch), np.dtype(np.float32))
        self.terminated = _shared((slots, batch), np.dtype(bool))
        self.truncated = _shared((slots, batch), np.dtype(bool))
        self.env_ids = _shared((slots, batch), np.dtype(np.int64))
        self.actions = _shared((slots, batch, *spec.action_shape), spec.action_dtype)
        self.sizes = _shared((slots,), np.dtype(np.int64))
        self.rng = _shared((slots, _RNG_WORDS), np.dtype(np.int64))  # the worker's RNG after the batch
        for name, (shape, dtype) in (extras or {}).items():  # what act() returns beside actions
            setattr(self, f"extra_{name}", _shared((slots, batch, *shape), np.dtype(dtype)))
        for name, (shape, dtype) in (state_spec or {}).items():  # the actor state each action saw
            setattr(self, f"state_{name}", _shared((slots, batch, *shape), np.dtype(dtype)))

    def views(self) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in vars(self).items()}


def write_batch(views: dict[str, np.ndarray], slot: int, step: Step, acted: Acted) -> int:
    """Write one batch into slot ``slot`` of ``views`` (arrays named as :class:`_Slabs`'s, a slot
    per leading index): what the env returned, the actions chosen with their extras and the
    actor state each saw, then the batch's size, last. Returns the size. Process actors write
    their shared-memory slabs with it, Ray actors the arrays a call returns."""
    n = len(step.env_ids)
    views["obs"][slot, :n] = step.obs
    views["rewards"][slot, :n] = step.rewards
    views["terminated"][slot, :n] = step.terminated
    views["truncated"][slot, :n] = step.truncated
    views["env_ids"][slot, :n] = step.env_ids
    views["actions"][slot, :n] = acted.actions
    for name, value in acted.extras.items():
        views[f"extra_{name}"][slot, :n] = value
    for name, value in acted.state.items():
        views[f"state_{name}"][slot, :n] = value
    views["sizes"][slot] = n
    return n


def _worker(index: int, make_env_args: dict[str, Any], algo_name: str, algo_params: dict[str, Any],
            store: WeightStore, slabs: _Slabs, control: torch.Tensor, conn: mpc.Connection,
            seed: int, pull_every: int) -> None:
    """The worker process: receive, pull weights, act, send; hand each batch over in a slot."""
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
        views, ctl = slabs.views(), control.numpy()
        free = list(range(len(views["sizes"])))
        # Made ready (env, network) while the loop starts; act only once it says so, with the
        # RNG state it may send and its env-step count in the control tensor.
        start = conn.recv_bytes()
        if struct.unpack_from("<i", start)[0] != _START:
            return
        if len(start) > 4:
            policy.set_rng_state(unpack_rng_state(np.frombuffer(start, np.int64, offset=4)))
        env.async_reset()
        while not ctl[_STOPPING]:
            t0 = time.perf_counter()
            step = env.recv()
            t1 = time.perf_counter()
            while not free:
                if conn.poll(0.1):
                    slot = struct.unpack("<i", conn.recv_bytes())[0]
                    if slot == _STOP:
                        return
                    free.append(slot)
                elif ctl[_STOPPING]:
                    return
            t2 = time.perf_counter()
            acted = policy.act(step.obs, step.env_ids, int(ctl[_ENV_STEPS]), step.terminated, step.truncated)
            env.send(acted.actions, step.env_ids)  # the envs step while the slot is written
            t3 = time.perf_counter()
            slot = free.pop()
            write_batch(views, slot, step, acted)
            views["rng"][slot] = pack_rng_state(policy.rng_state())
            conn.send_bytes(_READY.pack(slot, acted.weight_version, t1 - t0, t3 - t2, t2 - t1))
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
    """The loop's side of a process actor: starts and owns the worker, ingests its slots."""

    def __init__(self, index: int, spec: EnvSpec, make_env_args: dict[str, Any], algo_name: str,
                 algo_params: dict[str, Any], store: WeightStore, adder: Adder,
                 recorder: Recorder, seed: int, pull_every: int, slots: int = 4,
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                 state_spec: StateSpec | None = None):
        _refuse_inside_a_worker()
        num_envs = make_env_args["num_envs"]
        super().__init__(num_envs, store, adder, recorder)
        self.index = index
        batch = make_env_args.get("batch_size") or num_envs
        self._extras = list(extras or {})
        self._states = list(state_spec or {})
        self._slabs = _Slabs(slots, batch, spec, extras, state_spec)
        self._views = self._slabs.views()
        self._control = _shared((2,), np.dtype(np.int64))
        # The worker's RNG as of the last batch ingested (it draws as it acts): until the first,
        # the state it starts from.
        self._rng = pack_rng_state(np.random.default_rng([seed, index]).bit_generator.state)
        self._rng_set = False
        self._started = False
        self._conn, child_conn = mp.Pipe()
        self._process = _context().Process(
            target=_worker, name=f"{_WORKER_NAME}{index}", daemon=True,
            args=(index, make_env_args, algo_name, algo_params, store, self._slabs, self._control,
                  child_conn, seed, pull_every))
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

        def on_readable() -> None:
            # The pipe's end closes only when the worker exits, however it exits: a reliable
            # death notice (unlike the process sentinel, which a fork server killed by a
            # group-wide signal would fire for every worker).
            try:
                while self._conn.poll():
                    ready.put_nowait(self._conn.recv_bytes())
            except (EOFError, OSError):
                loop.remove_reader(self._conn.fileno())
                ready.put_nowait(None)

        # The worker's exploration schedule reads the env-step count from the control tensor:
        # a resumed run's count, before the worker's first action.
        self._control[_ENV_STEPS] = self.recorder.env_steps
        self._started = True
        self._send(struct.pack("<i", _START) + (self._rng.tobytes() if self._rng_set else b""))
        loop.add_reader(self._conn.fileno(), on_readable)
        timer, v = self.recorder.timer, self._views
        try:
            while True:
                message = await ready.get()
                if message is None:
                    if limiter.stopped:  # the run is ending: what the worker did no longer matters
                        return
                    self._process.join(timeout=1)
                    raise ActorDied(f"actor {self.index} (pid {self._process.pid}) died "
                                    f"with exit code {self._process.exitcode}")
                slot, version, env_wait, inference, slot_wait = _READY.unpack(message)
                n = int(v["sizes"][slot])
                step = Step(v["obs"][slot, :n], v["rewards"][slot, :n], v["terminated"][slot, :n],
                            v["truncated"][slot, :n], v["env_ids"][slot, :n])
                extras = {k: v[f"extra_{k}"][slot, :n] for k in self._extras} if self._extras else None
                state = {k: v[f"state_{k}"][slot, :n] for k in self._states} if self._states else None
                await self.ingest(limiter, step, v["actions"][slot, :n], extras, version, state)
                self._rng = v["rng"][slot].copy()
                self._send(struct.pack("<i", slot))
                self._control[_ENV_STEPS] = self.recorder.env_steps
                timer.add("actor_env_wait", env_wait)
                timer.add("actor_inference", inference)
                timer.add("actor_slot_wait", slot_wait)
                if on_steps():
                    return
        except LimiterStopped:
            return
        finally:
            loop.remove_reader(self._conn.fileno())

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
