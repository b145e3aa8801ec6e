"""The time of one update of a global batch with 1 learner and with N gloo learners (each on its
shard, gradients averaged by asyncrl/distributed.py), and the all-reduce's share of it, for
DQN's and SAC's preset networks on the CPU.

    python bench/ddp_update.py [--updates 400] [--repeats 3] [--learners 2] [--batch 128]

One torch thread per learner (a learner per core). Prints per algorithm: ms per update of the
global batch (median over repeats), updates/s, and for N learners the all-reduce's time (with
flattening and copying back) per update and its share; rank 0's figures (the ranks wait for
each other at every all-reduce, so they agree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algos.dqn import DQN, DQNConfig
from algos.sac import SAC, SACConfig
from asyncrl.core import EnvSpec, TransitionBatch
from asyncrl.distributed import DataParallel, shard
from asyncrl.learner_worker import join_group, leave_group, run_group

CPU = torch.device("cpu")
CARTPOLE = EnvSpec("CartPole-v1", (4,), np.dtype(np.float32), "discrete", 2, ())
PENDULUM = EnvSpec("Pendulum-v1", (3,), np.dtype(np.float32), "continuous", 0, (1,),
                   np.array([-2.0], np.float32), np.array([2.0], np.float32))


def make(kind: str, parallel_losses: bool = False) -> Any:
    if kind == "dqn":  # the preset: [128, 128], dueling, double
        return DQN(CARTPOLE, DQNConfig(**{k: v for k, v in DQN.preset["algo"].items() if k != "name"}), CPU)
    algo = {k: v for k, v in SAC.preset["algo"].items() if k != "name"}  # [64, 64]
    return SAC(PENDULUM, SACConfig(**algo, parallel_losses=parallel_losses), CPU)


def make_batch(kind: str, rows: int) -> TransitionBatch:
    g = torch.Generator().manual_seed(0)
    spec = CARTPOLE if kind == "dqn" else PENDULUM
    if kind == "dqn":
        actions = torch.randint(0, 2, (rows,), generator=g)
    else:
        actions = 4 * torch.rand(rows, 1, generator=g) - 2
    return TransitionBatch(torch.randn(rows, *spec.obs_shape, generator=g), actions,
                           torch.randn(rows, generator=g), torch.full((rows,), 0.97),
                           torch.randn(rows, *spec.obs_shape, generator=g), torch.ones(rows))


def time_updates(update, batch: TransitionBatch, updates: int) -> float:
    """Seconds per update, after a warm-up."""
    for _ in range(50):
        update(batch)
    start = time.perf_counter()
    for _ in range(updates):
        update(batch)
    return (time.perf_counter() - start) / updates


def _rank(rank: int, world_size: int, port: int, kind: str, rows: int, updates: int, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world_size, port, CPU)
    try:
        parallel = DataParallel(make(kind))
        local = shard(make_batch(kind, rows), rank, world_size)
        for _ in range(50):
            parallel.update(local)
        parallel.reduce_s = 0.0
        start = time.perf_counter()
        for _ in range(updates):
            parallel.update(local)
        seconds = (time.perf_counter() - start) / updates
        if rank == 0:
            Path(out).write_text(json.dumps({"update_s": seconds, "reduce_s": parallel.reduce_s / updates}))
    finally:
        leave_group()


def _latency(rank: int, world_size: int, port: int, sizes: list[int], out: str) -> None:
    """Seconds per all-reduce (sum) of a float32 tensor of each size, alone."""
    torch.set_num_threads(1)
    join_group(rank, world_size, port, CPU)
    try:
        seconds = {}
        for size in sizes:
            flat = torch.ones(size)
            seconds[size] = time_updates(lambda _: torch.distributed.all_reduce(flat), None, 1000)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        leave_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learners", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"global batch {args.batch}, {args.updates} updates, median of {args.repeats}, one torch thread each")
    for kind in ("dqn", "sac"):
        batch = make_batch(kind, args.batch)
        rows = [("1 learner", lambda: time_updates(make(kind).update, batch, args.updates), None)]
        if kind == "sac":
            rows.append(("1 learner, parallel_losses (2 threads)",
                         lambda: time_updates(make(kind, parallel_losses=True).update, batch, args.updates), None))
        for label, measure, _ in rows:
            ms = statistics.median(measure() for _ in range(args.repeats)) * 1e3
            print(f"{kind}  {label:40s} {ms:7.3f} ms/update  {1e3 / ms:7.0f} updates/s")
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rank0.json")
            for _ in range(args.repeats):
                run_group(_rank, args.learners, (kind, args.batch, args.updates, out), timeout_s=300)
                results.append(json.loads(Path(out).read_text()))
        update_s = statistics.median(r["update_s"] for r in results)
        reduce_s = statistics.median(r["reduce_s"] for r in results)
        print(f"{kind}  {f'{args.learners} gloo learners, {args.batch // args.learners} rows each':40s} "
              f"{update_s * 1e3:7.3f} ms/update  {1 / update_s:7.0f} updates/s  "
              f"all-reduce {reduce_s * 1e3:.3f} ms/update ({reduce_s / update_s:.0%})")
    # The buckets: DQN's network (one a backward pass), SAC's critics, SAC's policy with alpha.
    sizes = [1, sum(p.numel() for p in make("dqn")._params)]
    sac = make("sac")
    sizes += [sum(p.numel() for p in sac.critic.parameters()), sum(p.numel() for p in sac.actor.parameters()) + 1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "latency.json")
        run_group(_latency, args.learners, (sizes, out), timeout_s=300)
        for size, seconds in json.loads(Path(out).read_text()).items():
            print(f"all-reduce of {int(size):6d} floats alone ({args.learners} gloo ranks): {seconds * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
