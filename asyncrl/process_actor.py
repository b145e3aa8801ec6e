"""Process actors: EnvPool and policy inference in a worker process, finished batches handed to
the loop through shared-memory slabs (no pickling per step), weights pulled from the shared-memory
weight store by version.

The worker owns ``slabs`` slots of one batch each. It writes a batch (the observations it
received, what the env returned with them, the actions it chose) into a free slot and sends the
slot's number over a pipe; the loop ingests the slot into the replay under the rate limiter and
sends the number back. When every slot is full the worker waits, so the limiter throttles acting
as it does for inline actors. A worker that dies is reported in one line, never waited on."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection as mpc
import struct
import time
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from asyncrl.actor import ActorBase, EnvStates, act_with_state
from asyncrl.adders import NStepAdder
from asyncrl.core import EnvSpec, StateSpec, acting_copy, actor_state_spec, split_actions
from asyncrl.envs import Step
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")

_READY = struct.Struct("<iqddd")  # slot, weight version, seconds in env wait, inference, slot wait
_STOP = -1
_ENV_STEPS, _STOPPING = 0, 1  # entries of the shared control tensor


class ActorDied(RuntimeError):
    pass


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
        for name, (shape, dtype) in (extras or {}).items():  # what act() returns beside actions
            setattr(self, f"extra_{name}", _shared((slots, batch, *shape), np.dtype(dtype)))
        for name, (shape, dtype) in (state_spec or {}).items():  # the actor state each action saw
            setattr(self, f"state_{name}", _shared((slots, batch, *shape), np.dtype(dtype)))

    def views(self) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in vars(self).items()}


def write_batch(views: dict[str, np.ndarray], slot: int, step: Step, actions: np.ndarray,
                extras: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None) -> int:
    """Write one batch into slot ``slot`` of ``views`` (arrays named as :class:`_Slabs`'s, a slot
    per leading index): what the env returned, the actions chosen, their ``extras`` and the actor
    ``state`` each saw, then the batch's size, last. Returns the size. Process actors write their
    shared-memory slabs with it, Ray actors the arrays a call returns."""
    n = len(step.env_ids)
    views["obs"][slot, :n] = step.obs
    views["rewards"][slot, :n] = step.rewards
    views["terminated"][slot, :n] = step.terminated
    views["truncated"][slot, :n] = step.truncated
    views["env_ids"][slot, :n] = step.env_ids
    views["actions"][slot, :n] = actions
    for name, value in extras.items():
        views[f"extra_{name}"][slot, :n] = value
    for name, value in (state or {}).items():
        views[f"state_{name}"][slot, :n] = value
    views["sizes"][slot] = n
    return n


def _worker(index: int, make_env_args: dict[str, Any], algo_name: str, algo_params: dict[str, Any],
            store: WeightStore, slabs: _Slabs, control: torch.Tensor, conn: mpc.Connection,
            seed: int, pull_every: int) -> None:
    """The worker process: receive, pull weights, act, send; hand each batch over in a slot."""
    torch.set_num_threads(1)  # one thread is fastest for acting networks here (BENCHMARKS.md)
    from asyncrl import registry
    from asyncrl.envs import make_env

    env = make_env(**make_env_args)
    try:
        cls = registry.get(algo_name)
        algo = cls(env.spec, registry.algo_config(cls, algo_params), torch.device("cpu"))
        network = acting_copy(algo)
        state_spec = actor_state_spec(algo)
        states = EnvStates(state_spec, env.num_envs) if state_spec else None
        after_end = np.ones(env.num_envs, bool)  # an env's next observation begins an episode
        rng = np.random.default_rng([seed, index])
        views, ctl = slabs.views(), control.numpy()
        free = list(range(len(views["sizes"])))
        version, batches = 0, 0
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
            if batches % pull_every == 0:
                version = store.pull(network, version) or version
            batches += 1
            state: dict[str, np.ndarray] = {}
            with torch.inference_mode():  # ~30% less per-op overhead than no_grad for small nets
                if states is None:
                    actions, extras = split_actions(
                        algo.act(network, torch.from_numpy(step.obs), int(ctl[_ENV_STEPS]), rng))
                else:
                    actions, state = act_with_state(algo, network, step.obs, int(ctl[_ENV_STEPS]), rng,
                                                    states, step.env_ids, after_end[step.env_ids])
                    extras = {}
                    after_end[step.env_ids] = step.terminated | step.truncated
            env.send(actions, step.env_ids)  # the envs step while the slot is written
            t3 = time.perf_counter()
            slot = free.pop()
            write_batch(views, slot, step, actions, extras, state)
            conn.send_bytes(_READY.pack(slot, version, t1 - t0, t3 - t2, t2 - t1))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the loop stops us
        pass
    finally:
        env.close()


def _context():
    """Where workers start from: a fork server that has imported this module (torch), EnvPool and
    torch._dynamo once, so every later worker of the process starts in milliseconds instead of
    seconds of imports; plain spawn where fork servers do not exist (Windows). The engine imports
    EnvPool lazily, and torch imports torch._dynamo at the first optimizer an algorithm builds
    (~1.5 s here each): a worker forked from a server without them pays both."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "envpool", "torch._dynamo"])
    return ctx


def start_fork_server() -> None:
    """Start the fork server now (if not running yet), so that its imports overlap whatever the
    caller does before the first worker starts; a no-op where workers are spawned."""
    if "forkserver" in mp.get_all_start_methods():
        _context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


class ProcessActor(ActorBase):
    """The loop's side of a process actor: starts and owns the worker, ingests its slots."""

    def __init__(self, index: int, spec: EnvSpec, make_env_args: dict[str, Any], algo_name: str,
                 algo_params: dict[str, Any], store: WeightStore, adder: NStepAdder,
                 recorder: Recorder, seed: int, pull_every: int, slots: int = 4,
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                 state_spec: StateSpec | None = None):
        num_envs = make_env_args["num_envs"]
        super().__init__(num_envs, store, adder, recorder)
        self.index = index
        batch = make_env_args.get("batch_size") or num_envs
        self._extras = list(extras or {})
        self._states = list(state_spec or {})
        self._slabs = _Slabs(slots, batch, spec, extras, state_spec)
        self._views = self._slabs.views()
        self._control = _shared((2,), np.dtype(np.int64))
        self._conn, child_conn = mp.Pipe()
        self._process = _context().Process(
            target=_worker, name=f"asyncrl-actor-{index}", daemon=True,
            args=(index, make_env_args, algo_name, algo_params, store, self._slabs, self._control,
                  child_conn, seed, pull_every))
        self._process.start()
        child_conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[bytes | None] = asyncio.Queue()

        def on_readable() -> None:
            try:
                while self._conn.poll():
                    ready.put_nowait(self._conn.recv_bytes())
            except (EOFError, OSError):  # the worker is gone; its sentinel says how
                loop.remove_reader(self._conn.fileno())
                ready.put_nowait(None)

        loop.add_reader(self._conn.fileno(), on_readable)
        loop.add_reader(self._process.sentinel, lambda: ready.put_nowait(None))
        timer, v = self.recorder.timer, self._views
        try:
            while True:
                message = await ready.get()
                if message is None:
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
                self._conn.send_bytes(struct.pack("<i", slot))
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
            loop.remove_reader(self._process.sentinel)

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
