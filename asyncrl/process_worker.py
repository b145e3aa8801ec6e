"""The worker side of a process actor (:mod:`asyncrl.process_actor` is the loop's side): a
process that steps EnvPool, runs the policy (or, with central inference, asks the loop's
:mod:`asyncrl.inference` for its actions) and the adder, writes each batch straight into the
run's store in shared memory (through :mod:`asyncrl.writers`) and tells the loop what it wrote in
one fixed-size record. The record format and the control entries both sides use live here."""

from __future__ import annotations

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
from asyncrl.adders import Adder
from asyncrl.episodes import Episodes, check_finite
from asyncrl.faults import RunError
from asyncrl.inference import Requests
from asyncrl.shm import shared_zeros
from asyncrl.weights import WeightStore
from asyncrl.writers import StreamWriter, TrajectorySink

# Worker -> loop, after the hello: one fixed-size record per batch, written raw to the pipe (one
# write, atomic; the loop reads every record waiting in one read). A batch's slot, weight
# version, seconds in env wait, inference and slot wait, items written (for the gate), real env
# steps, episodes ended, steps whose inf/nan became 0, and whether the worker's slots are all in
# flight (it then waits for a wake-up). Slot -1: the run must stop, for the reason in ``error``.
# Slot -2 (central inference): a batch of ``written`` envs waits in the worker's requests to be
# acted on.
READY = struct.Struct("<iqdddiiiii")
FAILED, REQUEST = -1, -2
# Loop -> worker, framed messages: start (may carry RNG words), stop, wake-ups, and (central
# inference) the answer to a request is in the requests.
STOP, START, WAKE, ANSWERED = -1, -2, -3, -4
# Entries of the shared control tensor: the trainer's env steps, stop, nonfinite = "zero", and
# batches the loop has taken in (slots come back in order, so a count says which are free).
ENV_STEPS, STOPPING, ZERO_NONFINITE, TAKEN = 0, 1, 2, 3
WORKER_NAME = "asyncrl-actor-"
# A worker's exit code when it finds itself re-running the main script and starting a run.
UNGUARDED_MAIN = 87
_PARENT_CHECK_S = 1.0  # how long a worker waits on a stuck publish before it checks its parent


class _ParentGone(Exception):
    pass


def refuse_inside_a_worker() -> None:
    """A worker that starts a run is re-running an unguarded main script as it imports it (the
    fork server and spawn import the main module in each worker): it can never become a worker.
    Exit at once with a code the parent recognises, rather than let the script go on (a host's
    server or loop would keep the worker from ever starting, and its parent waiting)."""
    if mp.current_process().name.startswith(WORKER_NAME):
        sys.stderr.flush()
        os._exit(UNGUARDED_MAIN)


class Slots:
    """What the worker says of each batch beside the message: its RNG state after the batch,
    and the return and length of every episode that ended in it."""

    def __init__(self, slots: int, batch: int):
        self.rng = shared_zeros((slots, RNG_WORDS), np.dtype(np.int64))
        self.returns = shared_zeros((slots, batch), np.dtype(np.float64))
        self.lengths = shared_zeros((slots, batch), np.dtype(np.int64))
        self.error = shared_zeros((4096,), np.dtype(np.uint8))  # why the run must stop (UTF-8)

    def views(self) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in vars(self).items()}


def run_worker(index: int, make_env_args: dict[str, Any], algo_name: str, algo_params: dict[str, Any],
            store: WeightStore, writer: StreamWriter | TrajectorySink, make_adder: Callable[[Any], Adder],
            slots: Slots, control: torch.Tensor, conn: mpc.Connection, seed: int, pull_every: int,
            requests: Requests | None = None) -> None:
    """The worker process: receive, pull weights, act, send; write each batch into the store
    through ``writer`` and tell the loop what it wrote, in a slot. With ``requests`` (central
    inference) it builds no network: the loop acts on each batch it asks there."""
    # Signals are the parent's to handle: Ctrl-C in a terminal and GNU timeout signal the whole
    # process group, and a worker that ended on them would read as a dead actor. The parent
    # stops us with a message (or kills us); a parent that is gone closes our pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    env = None
    try:
        conn.send_bytes(b"")  # hello: the main module imported, this process can act
        torch.set_num_threads(1)  # one thread is fastest for acting networks here (BENCHMARKS.md)
        from asyncrl.envs import make_env

        parent = mp.parent_process()
        env = make_env(**make_env_args)
        policy = None
        if requests is None:  # local inference: the algorithm's acting network, here
            from asyncrl import registry

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
        if struct.unpack_from("<i", start)[0] != START:
            return
        if len(start) > 4 and policy is not None:
            policy.set_rng_state(unpack_rng_state(np.frombuffer(start, np.int64, offset=4)))
        nonfinite = "zero" if ctl[ZERO_NONFINITE] else "stop"
        writer.attach()
        adder = make_adder(writer)
        env.async_reset()
        while not ctl[STOPPING]:
            t0 = time.perf_counter()
            step = env.recv()
            t1 = time.perf_counter()
            while sent - ctl[TAKEN] >= num_slots:  # every slot in flight: wait to be woken
                if conn.poll(0.1):
                    if struct.unpack("<i", conn.recv_bytes())[0] == STOP:
                        return
                elif ctl[STOPPING]:
                    return
            t2 = time.perf_counter()
            try:
                zeroed = check_finite(step, nonfinite, make_env_args["env_id"], int(ctl[ENV_STEPS]))
            except RunError as exc:
                text = str(exc).encode()[:len(views["error"])]
                views["error"][:len(text)] = np.frombuffer(text, np.uint8)
                os.write(fd, READY.pack(FAILED, 0, 0, 0, 0, 0, 0, 0, 0, 0))
                return
            if policy is not None:
                acted = policy.act(step.obs, step.env_ids, int(ctl[ENV_STEPS]), step.terminated, step.truncated)
            else:
                requests.ask(step)
                os.write(fd, READY.pack(REQUEST, 0, 0, 0, 0, len(step.env_ids), 0, 0, 0, 0))
                if not _await_answer(conn, ctl):
                    return
                acted = requests.answer(len(step.env_ids))
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
            if policy is not None:  # central inference: the loop's policy step holds the RNG
                views["rng"][slot] = pack_rng_state(policy.rng_state())
            sent += 1
            os.write(fd, READY.pack(slot, acted.weight_version, t1 - t0, t3 - t2, t2 - t1, writer.finish(),
                                     counted.steps, ended, zeroed, int(sent - ctl[TAKEN] >= num_slots)))
    except (EOFError, BrokenPipeError, ConnectionResetError, _ParentGone):
        pass  # the parent is gone (or closed our pipe): nobody is left to hand batches to
    finally:
        if env is not None:
            env.close()


def _await_answer(conn: mpc.Connection, ctl: np.ndarray) -> bool:
    """Wait for the loop's answer to a request; False when told to stop meanwhile. Wake-ups
    (for slots) are of no use here: a slot was free when the request went out."""
    while True:
        if conn.poll(0.1):
            message = struct.unpack("<i", conn.recv_bytes())[0]
            if message == ANSWERED:
                return True
            if message == STOP:
                return False
        elif ctl[STOPPING]:
            return False


def _check_parent(parent) -> None:
    """Give up a pull that waits out a publish in progress once the parent is gone (a parent
    killed mid-publish leaves it in progress for good); while it lives, the pull waits on."""
    if parent is not None and not parent.is_alive():
        raise _ParentGone
