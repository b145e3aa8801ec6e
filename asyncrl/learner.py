"""The learner: the one loop over every data plan. It waits at the plan's gate (the rate limiter
of a replay, or a rollout queue), draws batches moved to the device (the plan's draw,
:mod:`asyncrl.draws`), updates in a worker thread (acting goes on meanwhile) or a slice of the
loop, writes priorities back and publishes weights. Beside it, where a learner runs and how its
maths is set up (the device, TF32, deterministic kernels, denormals flushed)."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from asyncrl.core import Algorithm
from asyncrl.draws import MixedDraw, QueueDraw, ReplayDraw
from asyncrl.faults import NonFiniteGuard, clone_state
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped
from asyncrl.weights import WeightStore

# Longest a chunk of updates may hold the event loop's thread (process actors): the loop's other
# tasks, and a host application's, wait meanwhile.
_LOOP_SLICE_S = 0.008


async def run_to_completion(executor: ThreadPoolExecutor, fn: Callable, *args):
    """``fn(*args)`` in ``executor``. If the awaiting task is cancelled meanwhile, ``fn`` is let
    finish before the cancellation goes on: no update runs on after its task ended."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def flushing_denormals() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero now (x86 FTZ/DAZ; torch has a
    setter, no getter): a denormal survives a multiplication only when it does not."""
    return bool(torch.tensor([1e-40]).mul_(1.0)[0] == 0.0)


@contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Treat denormal floats as zero in this thread while the block runs, then restore what the
    thread had (an embedding host's setting survives). Once an off-policy learner's gradients
    grow tiny, Adam's second moments go denormal and every op that touches them falls to the
    CPU's slow microcode path: measured here, SAC's fused Adam step took ~19% of the learner's
    time with denormals and 2% without (BENCHMARKS.md). A no-op where torch cannot set it."""
    if not enabled:
        yield
        return
    before = flushing_denormals()
    switched = not before and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switched:
            torch.set_flush_denormal(False)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"learner.device is {name!r} but CUDA is not available here")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"learner.device is {name!r}: {error}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"learner.device is {name!r} but this box has {torch.cuda.device_count()} CUDA device(s)")
    return device


def set_tf32(device: torch.device, on: bool) -> None:
    """learner.tf32 for a learner (or central inference) on ``device``: TF32 matmuls and cuDNN
    convolutions on CUDA, full float32 when off; the CPU is left as it is."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def deterministic_on_cuda() -> None:
    """Serial mode on CUDA: deterministic kernels (warning, not failing, where an op has none) and
    cuDNN's deterministic, unbenchmarked convolutions; cuBLAS needs its workspace setting before its
    first handle, which no CUDA work has made yet when a run is built."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def device_line(name: str, device: torch.device) -> str:
    """One line saying where the learner runs, and why the CPU when ``auto`` found no CUDA (a CPU
    torch build on a GPU box would otherwise train on the CPU silently)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"learner on {device} ({torch.cuda.get_device_name(index)})"
    if name == "auto":
        why = ("torch has no CUDA: a CPU build" if torch.version.cuda is None
               else "no CUDA device usable here")
        return f"learner on cpu ({why}, torch {torch.__version__})"
    return "learner on cpu"


class Learner:
    """The one learner loop, over any plan's gate (a rate limiter or a rollout queue: what
    permits a draw) and draw (what a batch is made of)."""

    def __init__(self, algo: Algorithm, gate: Any, draw: ReplayDraw | MixedDraw | QueueDraw, store: WeightStore,
                 recorder: Recorder, batch_size: int, publish_every: int, max_updates_per_call: int,
                 max_nonfinite_in_a_row: int = 50, flush_denormal: bool = True, acting_waits: bool = False):
        self.algo, self.gate, self.draw, self.store = algo, gate, draw, store
        self.flush_denormal = flush_denormal
        self.recorder, self.batch_size = recorder, batch_size
        self.publish_every, self.max_updates_per_call = publish_every, max_updates_per_call
        # Acting waits for every update (PPO): after the first, updates run in the loop's own
        # thread, since a worker thread would only contend for the GIL with the waiting actors.
        self.acting_waits = acting_waits
        self.guard = NonFiniteGuard(max_nonfinite_in_a_row)
        self.lock = asyncio.Lock()  # held while an update runs: checkpoints read a consistent state
        self._executor: ThreadPoolExecutor | None = None
        self._seconds_per_update = 0.0  # of the last chunk
        self._unpublished = False  # updates made since the last publish

    def sample(self, count: int = 1) -> list[tuple[Any, Any]]:
        """``count`` batches and their keys: the fixed cost of a draw, paid once per chunk."""
        return self.draw(count)

    def algo_state(self) -> dict[str, Any]:
        """The learning algorithm's state, for a checkpoint (taken between updates)."""
        return self.algo.state_dict()

    # Whether keep/restore work here: a data-parallel group's state lives in its ranks.
    restorable = True

    def keep(self) -> dict[str, Any]:
        """Between updates (under ``lock``): a copy of the algorithm's state, its weights published
        now if the last updates were not, so that the store's latest version is this state: an
        evaluation's policy, which :meth:`restore` brings back if the run stops on it."""
        if self._unpublished:
            self.store.publish(self.algo.acting_network)
            self._unpublished = False
        return clone_state(self.algo.state_dict())

    def restore(self, kept: dict[str, Any]) -> int:
        """Back to a state :meth:`keep` took (under ``lock``), published; its weight version."""
        self.algo.load_state_dict(kept)
        self._unpublished = False
        return self.store.publish(self.algo.acting_network)

    def close(self) -> None:
        """Release what the learner started (data-parallel learners' processes); idempotent."""

    def _update(self, batches: list[Any]) -> list[np.ndarray | None] | None:
        """Runs on the learner thread (or inline). None: the chunk was non-finite and rolled
        back (see :class:`NonFiniteGuard`); the restored weights are published then too, since
        actors that wait for each update (PPO) would otherwise wait for ever."""
        t0 = time.perf_counter()
        self.guard.before_chunk(self.algo)
        priorities, metrics = [], []
        with denormals_flushed(self.flush_denormal):
            for batch in batches:
                row, prio = self.algo.update(batch)
                priorities.append(prio)
                metrics.append(row)
        applied = self.guard.check(self.algo, metrics)
        if applied:
            self.recorder.losses = {**metrics[-1], **self.draw.metrics()}
        if applied and self.draw.prioritized:  # otherwise no device-to-host copy at all
            # The chunk's priorities come back in one copy, not one per update: on CUDA that and
            # the guard's check above are the chunk's only waits for its updates.
            given = [p for p in priorities if p is not None]
            host = iter(torch.stack(given).float().cpu().numpy() if given else ())
            priorities = [None if p is None else next(host) for p in priorities]
        else:
            priorities = [None] * len(batches)
        t1 = time.perf_counter()
        self.recorder.timer.add("update", t1 - t0)
        self._seconds_per_update = (t1 - t0) / len(batches)
        updates = self.recorder.updates + (len(batches) if applied else 0)
        if not applied or updates // self.publish_every > self.recorder.updates // self.publish_every:
            self.store.publish(self.algo.acting_network)
            self.recorder.timer.add("publish", time.perf_counter() - t1)
            self._unpublished = False
        else:
            self._unpublished = True  # the store holds an older version than the learner
        return priorities if applied else None

    def _finish(self, keys: list[Any], priorities: list[np.ndarray | None] | None) -> None:
        if priorities is None:  # rolled back: nothing was learnt
            return
        for k, p in zip(keys, priorities):
            if p is not None:
                self.draw.write_back(k, p)
        self.recorder.updates += len(keys)

    def step(self) -> None:
        """One update inline (serial mode); the caller has the gate's permission."""
        ((batch, keys),) = self.sample()
        self._finish([keys], self._update([batch]))

    def drain(self) -> None:
        """Serial mode: every update the gate allows now."""
        while self.gate.try_sample(self.batch_size):
            self.step()

    async def run(self, in_thread: bool) -> None:
        """The async-mode loop. ``in_thread``: run updates in a worker thread so that inline
        actors keep acting meanwhile. Without it (process actors, or acting that waits for each
        update) updates run in the loop's own thread, a chunk at a time: the workers act in their
        processes anyway, and two Python threads of one process would contend for its GIL. The
        first chunk runs in the thread either way: it may take seconds (an algorithm compiling
        its update, lazy allocations) and must not stall the loop meanwhile."""
        in_thread = in_thread and not self.acting_waits
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="asyncrl-learner")
        first = True
        try:
            while True:
                t0 = time.perf_counter()
                await self.gate.await_sample(self.batch_size)
                self.recorder.timer.add("sample_wait", time.perf_counter() - t0)
                # Take as many updates as the gate allows now, up to a cap: one hand-off (or
                # one stretch of the loop) per chunk instead of one per update.
                cap = self.max_updates_per_call
                if not in_thread and self._seconds_per_update > 0:
                    cap = max(1, min(cap, int(_LOOP_SLICE_S / self._seconds_per_update)))
                count = 1
                while count < cap and self.gate.try_sample(self.batch_size):
                    count += 1
                drawn = self.sample(count)
                async with self.lock:
                    if self.gate.stopped:  # stopped while waiting for the lock: keep the state
                        return
                    batches = [b for b, _ in drawn]
                    if not (in_thread or first):
                        priorities = self._update(batches)
                    else:
                        priorities = await run_to_completion(self._executor, self._update, batches)
                self._finish([k for _, k in drawn], priorities)
                first = False
                if not in_thread:
                    # Let the actors' batches in between chunks. A zero sleep runs only the
                    # callbacks already ready; 1 us also runs the loop's due timers (a host's,
                    # the progress display's) before the next chunk holds the GIL again.
                    await asyncio.sleep(1e-6)
        except LimiterStopped:
            return
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
