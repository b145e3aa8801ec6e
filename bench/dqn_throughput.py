"""DQN on CartPole-v1: env steps/s of the trainer (async and serial) beside the raw EnvPool rate.

    python bench/dqn_throughput.py [--steps 30000] [--repeats 3]

Measured side by side in one process, medians over repeats. Rows:
- raw EnvPool stepping with random actions, same env settings as the run;
- the default `run dqn` config: async mode with process actors (the CPU default), async mode with
  inline actors, and serial mode;
- the same three at samples-per-insert 8 with batch 32 and a [64, 64] network (one update per
  4 env steps, the Stable-Baselines3 comparison setting).
Evaluation is switched off so that the figures are training throughput only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time

import numpy as np

from algos.dqn import DQN
from asyncrl.config import build_config
from asyncrl.envs import make_env
from asyncrl.trainer import Trainer

SB3_MATCHED = ["learner.batch_size=32", "replay.samples_per_insert=8", "algo.hidden=[64, 64]"]


def raw_envpool(num_envs: int, steps: int) -> float:
    env = make_env("CartPole-v1", num_envs)
    rng = np.random.default_rng(0)
    env.async_reset()
    done, start = 0, time.perf_counter()
    while done < steps:
        step = env.recv()
        env.send(rng.integers(0, 2, len(step.env_ids)), step.env_ids)
        done += len(step.env_ids)
    rate = done / (time.perf_counter() - start)
    env.close()
    return rate


def trainer_rate(mode: str, steps: int, extra: list[str]) -> tuple[float, float]:
    placement = "inline" if mode == "serial" else mode
    overrides = [f"train.mode='{'serial' if mode == 'serial' else 'async'}'",
                 f"actors.placement='{placement}'", f"train.total_env_steps={steps}",
                 "train.eval_every=100000000", "train.checkpoint_every=100000000",
                 "train.target_return=1e9", "train.tensorboard=false", *extra]
    config = build_config(DQN.preset, overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        result = asyncio.run(Trainer(config, run_dir=run_dir).run())
    return result["env_steps"] / result["train_wall_s"], result["updates"] / result["train_wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("asyncrl").setLevel(logging.WARNING)
    num_envs = DQN.preset["env"]["num_envs"]
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every row alike
        rows.setdefault(f"raw EnvPool, {num_envs} envs, random actions", []).append(
            (raw_envpool(num_envs, 200_000), float("nan")))
        for label, extra in (("default run dqn", []), ("spi 8, batch 32, [64, 64]", SB3_MATCHED)):
            for mode in ("process", "inline", "serial"):
                name = f"{label}, {'serial' if mode == 'serial' else 'async ' + mode}"
                rows.setdefault(name, []).append(trainer_rate(mode, args.steps, extra))
    print(f"{'setting':<46} {'env steps/s':>12} {'updates/s':>10}   (median of {args.repeats})")
    for label, runs in rows.items():
        sps = statistics.median(r[0] for r in runs)
        ups = statistics.median(r[1] for r in runs)
        print(f"{label:<46} {sps:>12,.0f} {ups:>10,.0f}")


if __name__ == "__main__":
    main()
