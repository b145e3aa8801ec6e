"""Event-loop lag while a DQN CartPole run trains in the same loop: a probe task sleeps 10 ms over
and over and records how late each wake-up is. A host that embeds the trainer (a policy server,
a UI) sees this much delay on its own tasks.

    python bench/loop_lag.py [--steps 30000] [--set actors.placement='inline' ...]

Measured once each on the 2-core development box with nothing else running (2026-11-25, 08:15
UTC), 30,000 env steps of the DQN preset; figures and an earlier loaded run in BENCHMARKS.md:
    python bench/loop_lag.py
        placement auto (process actors): median 3.6 ms, p99 15.8 ms, max 25.7 ms
        (937 wake-ups, 1,974 env steps/s overall)
    python bench/loop_lag.py --set "actors.placement='inline'"
        inline actors: median 0.4 ms, p99 2.8 ms, max 4.8 ms (926 wake-ups, 2,690 env steps/s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from asyncrl import Trainer

SLEEP_S = 0.010


async def measure(steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_algo("dqn", run_dir=run_dir, overrides=[
            f"train.total_env_steps={steps}", "train.target_return=1e9", "train.tensorboard=false",
            *overrides])
        lags: list[float] = []

        async def probe() -> None:
            while True:
                start = time.perf_counter()
                await asyncio.sleep(SLEEP_S)
                lags.append(time.perf_counter() - start - SLEEP_S)

        async with asyncio.TaskGroup() as tg:
            probing = tg.create_task(probe())
            result = await trainer.run()
            probing.cancel()
    lags.sort()
    ms = [lag * 1e3 for lag in lags]
    return {"wakeups": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2),
            "env_steps": result["env_steps"], "env_steps_per_s": round(result["env_steps"] / result["train_wall_s"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30_000, help="env steps of the run (default 30000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args.steps, args.set))))


if __name__ == "__main__":  # process actors are spawned: guard the entry point
    main()
