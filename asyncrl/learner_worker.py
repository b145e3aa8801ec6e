"""The learner processes' side of a data-parallel learner group (:mod:`asyncrl.learner_group` is
the loop's side): how a process joins and leaves the learners' ``torch.distributed`` group
(:func:`join_group`, :func:`leave_group`; :func:`run_group` starts N of them for tests and
benchmarks), the layout of a batch in the shared-memory slabs both sides use
(:func:`batch_leaves`), and :func:`learner_main`, a learner process: join the group, build the
algorithm, then update on its shard of each chunk the loop hands over, gradients averaged by
:class:`~asyncrl.distributed.DataParallel`.

Learner processes ignore SIGINT and SIGTERM (the loop's to handle) and end when told, when the
loop's process is gone (their pipe closes) or when a collective fails (a peer died).
"""

from __future__ import annotations

import datetime
import io
import signal
import socket
import time
import traceback
from dataclasses import fields
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch
import torch.distributed as dist

from asyncrl.config import Config, validate
from asyncrl.core import EnvSpec, SequenceBatch, TrajectoryBatch, TransitionBatch
from asyncrl.distributed import DataParallel, average_metrics, shard
from asyncrl.faults import NonFiniteGuard, RunError
from asyncrl.learner import denormals_flushed, pick_device

# Bounds the group's rendezvous and, on gloo, each collective: a rank that hangs (not dies)
# fails its peers within it, and they report.
COLLECTIVE_TIMEOUT_S = 60.0
_BATCHES = {cls.__name__: cls for cls in (TransitionBatch, SequenceBatch, TrajectoryBatch)}


# --- the group --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the group's rendezvous. Another process could take
    it before rank 0 listens on it; a learner group starts once per run, so that race is
    accepted (a clash fails the join with "address already in use", never a wrong group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def learner_device(rank: int, device_type: str) -> torch.device:
    """One GPU per rank on CUDA (rank modulo the GPUs seen), else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device_type)


def join_group(rank: int, world_size: int, port: int, device: torch.device,
               timeout_s: float = 60.0) -> None:
    """Join the learners' group as ``rank`` of ``world_size`` (rendezvous on 127.0.0.1:``port``).
    ``timeout_s`` bounds the rendezvous and, on gloo, every collective: a peer that hangs fails
    the others' collectives within it (a peer that dies fails them at once)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave_group() -> None:
    """Leave the group (a no-op outside one); call it in ``finally``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_group(fn: Callable[..., None], world_size: int, args: tuple = (), timeout_s: float = 60.0
              ) -> None:
    """``fn(rank, world_size, port, *args)`` in ``world_size`` processes, joined within
    ``timeout_s`` (then every one is killed and TimeoutError raised): for tests and benchmarks;
    the engine starts and watches its learner processes itself. They start from the process
    actors' fork server (torch imported once: milliseconds a process, not seconds). An error in
    a rank is raised here (torch's ProcessRaisedException, naming the rank), the others ended."""
    import torch.multiprocessing as mp

    from asyncrl.process_actor import start_fork_server

    start_fork_server()
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_rank_main, args=(world_size, free_port(), fn, args),
                                 nprocs=world_size, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    fn(rank, world_size, port, *args)


# --- a batch in the slabs ---------------------------------------------------------------------


def batch_leaves(batch: Any) -> dict[Any, torch.Tensor]:
    """A batch's tensors by field (a dict field's by (field, key))."""
    out: dict[Any, torch.Tensor] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, dict):
            out.update({(f.name, k): v for k, v in value.items()})
        else:
            out[f.name] = value
    return out


def _rebuilt(cls: type, leaves: dict[Any, torch.Tensor]) -> Any:
    """The batch of :func:`batch_leaves`' answer."""
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
    return _rebuilt(type(batch), {k: v.to(device) for k, v in batch_leaves(batch).items()})


# --- a learner process ------------------------------------------------------------------------


def learner_main(rank: int, world_size: int, port: int, config_data: dict[str, Any], spec: EnvSpec,
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
    from asyncrl.wiring import make_algo  # the wiring imports this module (through learner_group)

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
