"""DQN update speed against torch's intra-op thread count, for the learner's default.

    python bench/torch_threads.py [--seconds 3] [--repeats 3]

Prints updates/s (median over repeats) per network width and thread count, measured side by side
in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from algos.dqn import DQN, DQNConfig
from asyncrl.core import EnvSpec, TransitionBatch

SPEC = EnvSpec("CartPole-v1", (4,), np.dtype(np.float32), "discrete", 2, ())


def updates_per_second(hidden: list[int], batch_size: int, seconds: float) -> float:
    algo = DQN(SPEC, DQNConfig(hidden=hidden), torch.device("cpu"))
    b = batch_size
    batch = TransitionBatch(torch.randn(b, 4), torch.randint(0, 2, (b,)), torch.randn(b),
                            torch.full((b,), 0.97), torch.randn(b, 4), torch.ones(b))
    for _ in range(50):
        algo.update(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        algo.update(batch)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'network':>12} {'batch':>5} {'threads':>7} {'updates/s':>10}")
    for hidden, batch in (([64, 64], 32), ([128, 128], 64), ([256, 256], 256)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = [updates_per_second(hidden, batch, args.seconds) for _ in range(args.repeats)]
            print(f"{str(hidden):>12} {batch:>5} {threads:>7} {statistics.median(runs):>10.0f}")


if __name__ == "__main__":
    main()
