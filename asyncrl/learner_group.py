"""Data-parallel learners in a run (``learner.num_learners = N > 1``): a learner placement, not a
second engine. The loop keeps the store, the gate and the draw (:class:`~asyncrl.learner.Learner`'s
own loop, unchanged); :class:`LearnerGroup` changes only where a chunk of updates runs: in N
learner processes of one ``torch.distributed`` group (their side: :mod:`asyncrl.learner_worker`),
each on its shard of every global batch, gradients averaged by
:class:`~asyncrl.distributed.DataParallel` (whose note says why that is exact).

How the parts fit
-----------------
- ``learner.num_learners = N > 1``: the wiring refuses, in one line, what cannot run
  (:func:`~asyncrl.distributed.check_data_parallel`, on-policy data, fewer GPUs than N on CUDA).
  The N learner processes start from the process actors' fork server at the first chunk; each
  joins the group (:func:`~asyncrl.learner_worker.join_group`: gloo on the CPU, NCCL with one GPU
  per rank, :func:`~asyncrl.learner_worker.learner_device`), builds the algorithm, loads the
  loop's state (after any resume: optimiser included, so any N resumes any N), wraps it in
  :class:`~asyncrl.distributed.DataParallel` and loops.
- Drawing stays with the loop: it awaits the limiter once per update of the global batch, draws
  each global batch once (weights normalised over it) and copies a chunk's batches into
  shared-memory slabs; a small message per rank says "update on the first k"; each rank cuts its
  rows (:func:`~asyncrl.distributed.shard`) and writes its shard's priorities into a shared slab
  (no collective).
- Rank 0 alone publishes weights and answers with the chunk's metrics, averaged over the ranks
  in one all-reduce per chunk (:func:`~asyncrl.distributed.average_metrics`) that also carries the
  non-finite guard's verdict, so every rank rolls back alike.
- Checkpoints: the loop asks rank 0 for its state and writes it, once.
- A learner process that dies: its pipe closes and its peers' next collective fails at once
  (gloo: connection closed; NCCL: the group's timeout); the loop ends the run with one line
  naming the rank and how it ended. Stop and Ctrl-C stop every learner (asked, then killed).
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from asyncrl.config import Config
from asyncrl.core import EnvSpec
from asyncrl.distributed import batch_rows
from asyncrl.faults import RunError
from asyncrl.learner import Learner
from asyncrl.learner_worker import batch_leaves, free_port, learner_main
from asyncrl.shm import shared_zeros

log = logging.getLogger("asyncrl")

# After the first sign of a failure: how long the other ranks may take to say theirs.
_SETTLE_S = 2.0


@dataclass
class _Rank:
    index: int
    process: Any
    conn: Connection
    error: str | None = None
    run_error: bool = False
    ended: bool = False  # its pipe closed


class LearnerGroup(Learner):
    """The one learner loop, with each chunk's updates run by ``config.learner.num_learners``
    data-parallel learner processes (see the module's note)."""

    def __init__(self, *args: Any, config: Config, spec: EnvSpec, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config, self.spec = config, spec
        self.world_size = config.learner.num_learners
        self.reduce_s = 0.0  # rank 0's time in gradient all-reduces so far
        self.update_s = 0.0  # the loop's time waiting for chunks of updates so far (with starting)
        self._ranks: list[_Rank] = []
        self._slabs: dict[Any, torch.Tensor] = {}
        self._priorities: torch.Tensor | None = None
        self._pipe = threading.Lock()  # one exchange at a time (learner thread, checkpoints)
        self._closed = False
        self._ready = False  # every rank joined the group and loaded the state

    @property
    def pids(self) -> list[int]:
        """The learner processes' ids, rank order (empty before the first chunk)."""
        return [r.process.pid for r in self._ranks]

    async def run(self, in_thread: bool) -> None:
        # Waiting for the ranks holds no GIL: in a thread, the loop goes on meanwhile.
        await super().run(in_thread=True)

    # --- a chunk --------------------------------------------------------------------------

    def _update(self, batches: list[Any]) -> list[np.ndarray | None] | None:
        t0 = time.perf_counter()
        with self._pipe:
            self._start()
            fresh = self._fill(batches)
            if fresh is not None:
                self._exchange(fresh, reply=False)
            before = self.recorder.updates
            publish = (before + len(batches)) // self.publish_every > before // self.publish_every
            head = self._exchange(("chunk", len(batches), publish))[0]
        _, applied, given, losses, skipped, reduce_s = head
        self.guard.skipped_updates = skipped
        self.recorder.timer.add("allreduce", reduce_s - self.reduce_s)
        self.reduce_s = reduce_s
        priorities: list[np.ndarray | None] = [None] * len(batches)
        if applied:
            self.recorder.losses = {**losses, **self.draw.metrics()}
            if self.draw.prioritized:
                rows = batch_rows(batches[0])
                priorities = [self._priorities[i, :rows].numpy().copy() if has else None
                              for i, has in enumerate(given)]
        t1 = time.perf_counter()
        self.recorder.timer.add("update", t1 - t0)
        self.update_s += t1 - t0
        self._seconds_per_update = (t1 - t0) / len(batches)
        return priorities if applied else None

    def _fill(self, batches: list[Any]) -> tuple | None:
        """Copy the batches into the slabs; the message handing new slabs over, when the
        batches did not fit the ones there were (the first chunk)."""
        leaves = [batch_leaves(b) for b in batches]
        fits = bool(self._slabs) and self._slabs.keys() == leaves[0].keys() and all(
            len(self._slabs[k]) >= len(batches) and
            self._slabs[k].shape[1:] == v.shape and self._slabs[k].dtype == v.dtype for k, v in leaves[0].items())
        fresh = None
        if not fits:
            cap = max(self.max_updates_per_call, len(batches))
            self._slabs = {k: shared_zeros((cap, *v.shape), _numpy_dtype(v.dtype))
                           for k, v in leaves[0].items()}
            self._priorities = shared_zeros((cap, batch_rows(batches[0])), np.dtype(np.float32))
            fresh = ("slabs", type(batches[0]).__name__, self._slabs, self._priorities)
        for i, tensors in enumerate(leaves):
            for k, v in tensors.items():
                self._slabs[k][i].copy_(v)
        return fresh

    restorable = False  # the ranks hold the state: an evaluation with a target pauses learning

    def algo_state(self) -> dict[str, Any]:
        """Rank 0's state (every rank's), loaded into the loop's copy too; the loop's own before
        the learners started."""
        with self._pipe:
            if not self._ranks:
                return self.algo.state_dict()
            (_, data), = self._exchange(("state",), ranks=self._ranks[:1])
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.algo.load_state_dict(state)
        return state

    # --- the processes --------------------------------------------------------------------

    def _start(self) -> None:
        if self._ranks:
            return
        if self._closed:
            raise RunError("the learner group is closed")
        from asyncrl.process_actor import start_fork_server

        start_fork_server()
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        port, config = free_port(), self.config.to_dict()
        buffer = io.BytesIO()
        torch.save(self.algo.state_dict(), buffer)
        for rank in range(self.world_size):
            conn, child = ctx.Pipe()
            process = ctx.Process(target=learner_main, name=f"asyncrl-learner{rank}", daemon=True,
                                  args=(rank, self.world_size, port, config, self.spec, self.store, child))
            process.start()
            child.close()
            self._ranks.append(_Rank(rank, process, conn))
        self._exchange(("init", buffer.getvalue()))
        self._ready = True
        log.info("%d data-parallel learners (pids %s)", self.world_size, ", ".join(map(str, self.pids)))

    def _exchange(self, message: tuple, ranks: list[_Rank] | None = None, reply: bool = True) -> list:
        """Send ``message`` to ``ranks`` (all) and wait for each one's reply; RunError, one line,
        when a rank died or failed instead."""
        ranks = self._ranks if ranks is None else ranks
        for r in ranks:
            try:
                r.conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                r.ended = True
                raise self._failure()
        if not reply:
            return []
        pending = {r.conn: r for r in ranks}
        replies: dict[int, Any] = {}
        while pending:
            for conn in wait(list(pending), timeout=1.0):
                r = pending.pop(conn)
                if not self._receive(r, replies):
                    raise self._failure()
            if any(r.process.exitcode is not None for r in pending.values()):
                raise self._failure()
        return [replies[r.index] for r in ranks]

    @staticmethod
    def _receive(r: _Rank, replies: dict[int, Any]) -> bool:
        try:
            answer = r.conn.recv()
        except (EOFError, OSError):
            r.ended = True
            return False
        if answer[0] == "error":
            r.error, r.run_error = answer[1], answer[2]
            return False
        replies[r.index] = answer
        return True

    def _failure(self) -> RunError:
        """What ended the group, in one line: a rank that died without a word first (its
        peers' errors follow from it), else the first rank's error."""
        deadline = time.monotonic() + _SETTLE_S
        for r in self._ranks:  # each says its error, or its pipe closes
            while not (r.ended or r.error) and time.monotonic() < deadline:
                if r.conn.poll(max(0.0, deadline - time.monotonic())):
                    self._receive(r, {})
        self._closed = True
        for r in self._ranks:
            r.process.join(timeout=max(0.0, deadline - time.monotonic()))
        died = [r for r in self._ranks if r.ended and r.error is None]
        if died:
            r = died[0]
            code = r.process.exitcode
            how = ("still running" if code is None else f"killed by {signal.Signals(-code).name}"
                   if code < 0 else f"exit code {code}")
            # Before it was ready, the usual cause is a script that starts a run at import: the
            # learner processes import the main module.
            hint = "" if self._ready else (" while starting; its error is above (a script that "
                                           'starts a run must guard it with `if __name__ == "__main__":`)')
            return RunError(f"learner rank {r.index} (pid {r.process.pid}) of {self.world_size} "
                            f"died ({how}){hint}: the run stops")
        r = next((r for r in self._ranks if r.error), None)
        if r is None:
            return RunError(f"the {self.world_size} learner processes ended unexpectedly: the run stops")
        return RunError(r.error if r.run_error else f"learner rank {r.index} of {self.world_size} "
                        f"failed: {r.error}")

    def close(self, timeout: float = 5.0) -> None:
        """Stop every learner process: asked first, killed after ``timeout``."""
        self._closed = True
        ranks, self._ranks = self._ranks, []
        for r in ranks:
            try:
                r.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for r in ranks:
            r.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                log.warning("learner rank %d did not stop within %.0f s; killing it", r.index, timeout)
                r.process.kill()
                r.process.join()
            r.conn.close()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
