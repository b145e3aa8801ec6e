"""The event loop's share of acting: env steps/s of a run's actors with no learner, and the loop
thread's CPU time per env step (microseconds), for any algorithm and config.

    python bench/loop_cpu.py dqn --set env.num_envs=64 --set env.batch_size=32 --seconds 5 --repeats 3

It uses only what every version of the engine has (``build``, ``actor.run``, the recorder), so
the same file measures an older checkout side by side: ``cd <worktree> && python
/path/to/bench/loop_cpu.py ...`` (python puts the worktree's ``asyncrl`` first on the path when
run from it with ``-m``; as a script, set ``PYTHONPATH=.``). One JSON line per repeat, then the
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from asyncrl import registry
from asyncrl.config import build_config
from asyncrl.metrics import Recorder
from asyncrl.trainer import build


async def measure(config, seconds: float, warmup_s: float) -> dict[str, float]:
    recorder = Recorder(10**9, [])
    c = build(config, recorder)
    done = False
    try:
        async with asyncio.TaskGroup() as tg:
            for actor in c.actors:
                tg.create_task(actor.run(c.limiter, lambda: done))
            while recorder.env_steps == 0:
                await asyncio.sleep(0.02)
            await asyncio.sleep(warmup_s)
            s0, c0, t0 = recorder.env_steps, time.thread_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            s1, c1, t1 = recorder.env_steps, time.thread_time(), time.perf_counter()
            done = True
            c.limiter.stop()
    finally:
        c.limiter.stop()
        for actor in c.actors:
            actor.close()
    return {"env_steps_per_s": (s1 - s0) / (t1 - t0), "loop_cpu_us_per_env_step": 1e6 * (c1 - c0) / (s1 - s0),
            "loop_cpu_share": (c1 - c0) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algo")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cls = registry.get(args.algo)
    # No learner: nothing samples, so the limiter must never hold inserts back.
    config = build_config(cls.preset, overrides=["replay.error_buffer=1e12", "actors.placement='process'",
                                                 *args.overrides])
    runs = []
    for _ in range(args.repeats):
        runs.append(asyncio.run(measure(config, args.seconds, 1.0)))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}))


if __name__ == "__main__":
    sys.exit(main())
