"""Event-loop lag while a DQN CartPole run starts, trains and stops in the same loop: a probe task
sleeps 10 ms over and over, from before ``run()`` is called to after it returns, and records how
late each wake-up is, per phase (start, train, stop). A host that embeds the trainer (a policy
server, a UI) sees this much delay on its own tasks. The bar: p99 <= 20 ms and no stall over
100 ms, from ``run()`` to its return.

    python bench/loop_lag.py [--steps 30000] [--set actors.placement='inline' ...]

Three runs each beside the commit before (2026-12-03, 2 cores shared, load 1.2-2.1), medians:
the start phase went from 3 stalls over 100 ms (max 266 ms) to none (max 20 ms) once what a run
imports comes with ``from asyncrl import Trainer``; the train phase's p99 stays ~25 ms (the
learner's chunks; 11 ms with the learner yielding behind due timers); stop stays under 10 ms.
Figures and older runs in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time

# Before the loop runs, as a host should: this import brings what every run needs (EnvPool,
# torch._dynamo), which run() would otherwise import on its I/O thread, stalling the loop.
from asyncrl import Trainer

SLEEP_S = 0.010


async def measure(steps: int, overrides: list[str]) -> dict:
    """Probe the loop from before ``run()`` is called to after it returns: start-up (imports, the
    env probe, worker processes, networks) and shutdown (final evaluation and checkpoint, joining
    workers) included, each wake-up labelled with the run's phase."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_algo("dqn", run_dir=run_dir, overrides=[
            f"train.total_env_steps={steps}", "train.target_return=1e9", "train.tensorboard=false",
            *overrides])
        lags: dict[str, list[float]] = {"start": [], "train": [], "stop": []}
        done = False

        def phase() -> str:
            if trainer.recorder is None:
                return "start"
            return "stop" if trainer.recorder.env_steps >= steps or done else "train"

        async def probe() -> None:
            while True:
                start = time.perf_counter()
                await asyncio.sleep(SLEEP_S)
                lags[phase()].append(time.perf_counter() - start - SLEEP_S)

        async with asyncio.TaskGroup() as tg:
            probing = tg.create_task(probe())
            await asyncio.sleep(5 * SLEEP_S)  # the probe is running before run() is called
            modules_before = len(sys.modules)
            result = await trainer.run()
            imported = len(sys.modules) - modules_before
            done = True
            await asyncio.sleep(5 * SLEEP_S)
            probing.cancel()
    figures: dict = {}
    for name, values in (("all", [x for v in lags.values() for x in v]), *lags.items()):
        ms = sorted(lag * 1e3 for lag in values)
        if ms:
            figures[name] = {"wakeups": len(ms), "median_ms": round(statistics.median(ms), 2),
                             "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2),
                             "stalls_over_100ms": sum(x > 100 for x in ms)}
    figures["env_steps"] = result["env_steps"]
    figures["env_steps_per_s"] = round(result["env_steps"] / result["train_wall_s"])
    figures["modules_imported_by_run"] = imported
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30_000, help="env steps of the run (default 30000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args.steps, args.set))))


if __name__ == "__main__":  # process actors are spawned: guard the entry point
    main()
