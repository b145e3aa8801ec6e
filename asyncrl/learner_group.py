"""Data-parallel learners in a run (``learner.num_learners = N > 1``): a learner placement, not a
second engine. The loop keeps the store, the gate and the draw (:class:`~asyncrl.learner.Learner`'s
own loop, unchanged); :class:`LearnerGroup` changes only where a chunk of updates runs: in N
learner processes of one ``torch.distributed`` group, each on its shard of every global batch,
gradients averaged by :class:`~asyncrl.distributed.DataParallel`. How the parts fit (slabs,
publishing, priorities, checkpoints, failures) is the end of :mod:`asyncrl.distributed`'s note.

Learner processes ignore SIGINT and SIGTERM (the loop's to handle) and end when told, when the
loop's process is gone (their pipe closes) or when a collective fails (a peer died).
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from asyncrl.config import Config, validate
from asyncrl.core import EnvSpec, SequenceBatch, TrajectoryBatch, TransitionBatch
from asyncrl.distributed import (DataParallel, average_metrics, batch_rows, free_port, join_group,
                                 learner_device, leave_group, shard)
from asyncrl.faults import NonFiniteGuard, RunError
from asyncrl.learner import Learner, denormals_flushed, pick_device
from asyncrl.shm import shared_zeros

log = logging.getLogger("asyncrl")

# Bounds the group's rendezvous and, on gloo, each collective: a rank that hangs (not dies)
# fails its peers within it, and they report.
COLLECTIVE_TIMEOUT_S = 60.0
# After the first sign of a failure: how long the other ranks may take to say theirs.
_SETTLE_S = 2.0
_BATCHES = {cls.__name__: cls for cls in (TransitionBatch, SequenceBatch, TrajectoryBatch)}


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
        leaves = [_leaves(b) for b in batches]
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
        for i, batch_leaves in enumerate(leaves):
            for k, v in batch_leaves.items():
                self._slabs[k][i].copy_(v)
        return fresh

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
            process = ctx.Process(target=_learner_main, name=f"asyncrl-learner{rank}", daemon=True,
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


def _leaves(batch: Any) -> dict[Any, torch.Tensor]:
    """A batch's tensors by field (a dict field's by (field, key))."""
    out: dict[Any, torch.Tensor] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, dict):
            out.update({(f.name, k): v for k, v in value.items()})
        else:
            out[f.name] = value
    return out


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _rebuilt(cls: type, leaves: dict[Any, torch.Tensor]) -> Any:
    """The batch of :func:`_leaves`' answer."""
    kwargs: dict[str, Any] = {}
    for key, value in leaves.items():
        if isinstance(key, tuple):
            kwargs.setdefault(key[0], {})[key[1]] = value
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _to(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    return _rebuilt(type(batch), {k: v.to(device) for k, v in _leaves(batch).items()})


# --- a learner process ------------------------------------------------------------------------


def _learner_main(rank: int, world_size: int, port: int, config_data: dict[str, Any], spec: EnvSpec,
                  store: Any, conn: Connection) -> None:
    """A learner process: join the group, build the algorithm, then update on each chunk the loop
    hands over until told to stop (or the loop's process is gone: its pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _serve(rank, world_size, port, validate(config_data), spec, store, conn)
    except (EOFError, BrokenPipeError):
        pass  # the loop is gone
    except BaseException as exc:  # noqa: BLE001 - reported to the loop, in one line
        traceback.print_exc()
        line = " ".join(str(exc).split()) or type(exc).__name__
        try:
            conn.send(("error", line if isinstance(exc, RunError) else f"{type(exc).__name__}: {line}",
                       isinstance(exc, RunError)))
        except OSError:
            pass
    finally:
        leave_group()


def _serve(rank: int, world_size: int, port: int, config: Config, spec: EnvSpec, store: Any,
           conn: Connection) -> None:
    from asyncrl.wiring import make_algo  # the wiring imports this module

    lc = config.learner
    torch.set_num_threads(lc.torch_threads)
    device = learner_device(rank, pick_device(lc.device).type)
    join_group(rank, world_size, port, device, timeout_s=COLLECTIVE_TIMEOUT_S)
    algo = make_algo(config, spec, device)
    _, state = conn.recv()
    algo.load_state_dict(torch.load(io.BytesIO(state), map_location=device, weights_only=True))
    torch.manual_seed(config.train.seed + 1 + rank)  # noise inside an update differs per rank
    parallel = DataParallel(algo)
    guard = NonFiniteGuard(lc.max_nonfinite_in_a_row)
    conn.send(("ready",))
    cls, slabs, priorities = None, {}, None
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "slabs":
            _, name, slabs, priorities = message
            cls = _BATCHES[name]
        elif kind == "state":
            buffer = io.BytesIO()
            torch.save(algo.state_dict(), buffer)
            conn.send(("state", buffer.getvalue()))
        elif kind == "chunk":
            _, count, publish = message
            guard.before_chunk(algo)
            metrics, given, prios = [], [], []
            with denormals_flushed(lc.flush_denormal):
                for i in range(count):
                    mine = shard(_rebuilt(cls, {k: slab[i] for k, slab in slabs.items()}), rank, world_size)
                    row, prio = parallel.update(_to(mine, device))
                    metrics.append(row)
                    given.append(prio is not None)
                    if prio is not None:
                        prios.append((i, prio.detach().float()))
            if prios:  # one copy to the host per chunk, not a device sync per update
                size = len(prios[0][1])
                host = torch.stack([p for _, p in prios]).cpu()
                for (i, _), row in zip(prios, host):
                    priorities[i, rank * size:(rank + 1) * size] = row
            # The chunk's verdict rides in the one all-reduce of its metrics: all ranks alike.
            last = {**metrics[-1], "_finite": float(NonFiniteGuard.finite(metrics))}
            averaged = {k: float(v) for k, v in average_metrics(last).items()}
            applied = guard.check(algo, metrics, finite=averaged.pop("_finite") == 1.0)
            if rank == 0:
                if publish or not applied:
                    store.publish(algo.acting_network)
                conn.send(("done", applied, given, averaged, guard.skipped_updates, parallel.reduce_s))
            else:
                conn.send(("done",))
