"""Soak: a long DQN CartPole run, to see whether throughput decays or memory grows.

    python bench/soak.py                      # 20 minutes; wants a quiet machine
    python bench/soak.py --duration-s 60 --warmup-s 10 --window-s 20 --set replay.capacity=20000

Samples env steps, replay fill and resident memory (this process plus its actor workers) once a
second, and prints: env steps/s over the first and the last ``--window-s`` seconds after
``--warmup-s`` of warm-up, their ratio, and how much the resident memory grew from the moment the
replay was full to the end (a full replay should hold memory flat). The run never stops on a
target return and is stopped after ``--duration-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time

from asyncrl import Trainer


def rss_mib() -> float:
    """Resident memory of this process and its live children, in MiB."""
    total = 0
    for pid in [os.getpid(), *(p.pid for p in multiprocessing.active_children())]:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


async def soak(args: argparse.Namespace) -> dict:
    samples: list[tuple[float, int, float, float]] = []  # (seconds, env steps, replay fill, RSS MiB)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_algo("dqn", run_dir=run_dir, overrides=[
            "train.total_env_steps=1_000_000_000", "train.target_return=1e18", "train.tensorboard=false",
            *args.set])

        async def sample() -> None:
            start = time.perf_counter()
            while True:
                await asyncio.sleep(1.0)
                c = trainer.c
                if c is None:
                    continue
                elapsed = time.perf_counter() - start
                samples.append((elapsed, c.recorder.env_steps, c.replay.fill, rss_mib()))
                if elapsed >= args.duration_s:
                    trainer.stop()
                    return

        async with asyncio.TaskGroup() as tg:
            tg.create_task(sample())
            await trainer.run()
    return report(samples, args.warmup_s, args.window_s)


def rate(samples: list, t0: float, t1: float) -> float | None:
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def report(samples: list, warmup_s: float, window_s: float) -> dict:
    end = samples[-1][0]
    first = rate(samples, warmup_s, warmup_s + window_s)
    last = rate(samples, end - window_s, end)
    full = next((s for s in samples if s[2] >= 1.0), None)
    return {
        "seconds": round(end, 1), "env_steps": samples[-1][1],
        "first_window_env_steps_per_s": first and round(first),
        "last_window_env_steps_per_s": last and round(last),
        "last_over_first": first and last and round(last / first, 3),
        "rss_mib_when_replay_full": full and round(full[3], 1),
        "rss_mib_at_end": round(samples[-1][3], 1),
        "rss_growth_mib_after_full": full and round(samples[-1][3] - full[3], 1),
        "replay_full_at_s": full and round(full[0], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=1200.0, help="run length (default 20 minutes)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="ignored at the start (default 60)")
    p.add_argument("--window-s", type=float, default=300.0, help="first and last windows (default 300)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args()
    print(json.dumps(asyncio.run(soak(args))))


if __name__ == "__main__":  # process actors are spawned: guard the entry point
    main()
