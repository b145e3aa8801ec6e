"""asyncrl beside Stable-Baselines3: env steps/s of the same work, in one process, interleaved.

    pip install -e ".[bench]"
    python bench/peers.py [--steps N] [--repeats K] [--threads auto|N] [--algos dqn,ppo,sac] [--json FILE]

Each workload is one entry of WORKLOADS: a name, how to build the SB3 model, and the asyncrl
variants (config overrides on the algorithm's preset). For every row the torch thread count is
picked first by short runs at 1 and at 2 threads (unless --threads gives it); then the rows run
one after the other, repeat after repeat, so that drift in machine load hits every row alike.
Figures are medians over repeats.

- SB3: env steps taken (N; PPO rounds up to whole rollouts) / wall time of
  ``learn(total_timesteps=N)`` (building the model excluded); updates from
  ``model._n_updates`` (for PPO, times the minibatches per epoch: gradient steps).
- asyncrl: ``env_steps / train_wall_s`` of ``Trainer.run()``, training only: no evaluation or
  checkpoint during the run, and ``train_wall_s`` stops before the final ones. It does count the
  run's start (building the networks, starting the actor worker), which SB3's figure does not.
- steady: both sides' env steps/s over the second half of each run (SB3: a callback stamps the
  step that crosses half way; asyncrl: the metrics rows, one per tenth of the run), where the
  start (and the warm-up before learning) is behind both.

SAC on Pendulum-v1 is matched too: one env each side, [256, 256] networks, batch 256, lr 1e-3,
100 random steps, one update per env step; and on HalfCheetah-v5 with the MuJoCo settings (lr 3e-4,
a 1M replay), 100 random steps.

DQN on CartPole-v1 is the matched workload: SB3 steps one gymnasium env, asyncrl its preset's 8
EnvPool envs, both with a [64, 64] network, batch 32 and one update per 4 env steps. A workload
whose algorithm asyncrl lacks (``asyncrl.registry.names()``) is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from asyncrl import registry
from asyncrl.config import build_config
from asyncrl.metrics import read_jsonl
from asyncrl.trainer import Trainer

# Stable-Baselines3 is imported inside the builders: asyncrl's actor workers are spawned and
# re-import this module, and should not pay for SB3's import.


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    gradient_steps_per_update: int = 1  # PPO: an asyncrl update is a rollout's epochs x minibatches


@dataclass(frozen=True)
class Workload:
    name: str
    algo: str  # asyncrl registry name
    default_steps: int
    sb3_label: str
    sb3_model: Callable[[int], Any]  # seed -> an SB3 model, not yet trained
    sb3_updates: Callable[[Any], int]  # gradient steps a trained model took
    asyncrl: tuple[Variant, ...]


def sb3_dqn_cartpole(seed: int) -> Any:
    import gymnasium as gym
    from stable_baselines3 import DQN

    return DQN("MlpPolicy", gym.make("CartPole-v1"), batch_size=32, train_freq=4, gradient_steps=1,
               learning_starts=1000, buffer_size=100_000, target_update_interval=1000,
               policy_kwargs=dict(net_arch=[64, 64]), seed=seed, device="cpu", verbose=0)


def sb3_ppo_cartpole(seed: int) -> Any:
    """RL-Zoo's hyperparameters for CartPole-v1 (hyperparams/ppo.yml)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    return PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=seed), n_steps=32,
               batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
               learning_rate=lambda progress: progress * 1e-3,
               clip_range=lambda progress: progress * 0.2, seed=seed, device="cpu", verbose=0)


def sb3_sac_pendulum(seed: int) -> Any:
    """RL-Zoo's Pendulum-v1 settings; SAC's defaults: [256, 256], batch 256, 100 random steps,
    one update per env step, a learned temperature."""
    import gymnasium as gym
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_rate=1e-3, train_freq=1,
               gradient_steps=1, batch_size=256, learning_starts=100,
               policy_kwargs=dict(net_arch=[256, 256]), seed=seed, device="cpu", verbose=0)


def sb3_sac_halfcheetah(seed: int) -> Any:
    """SAC's usual MuJoCo settings ([256, 256], batch 256, lr 3e-4, a 1M replay, an update per
    env step), with 100 random steps instead of 10k: a throughput run, not a learning one."""
    import gymnasium as gym
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", gym.make("HalfCheetah-v5"), learning_rate=3e-4, train_freq=1,
               gradient_steps=1, batch_size=256, learning_starts=100, buffer_size=1_000_000,
               policy_kwargs=dict(net_arch=[256, 256]), seed=seed, device="cpu", verbose=0)


def sb3_updates(model: Any) -> int:
    return model._n_updates


def sb3_ppo_gradient_steps(model: Any) -> int:
    # PPO counts epochs in _n_updates; each epoch runs ceil(rollout / batch) minibatches.
    return model._n_updates * math.ceil(model.n_steps * model.n_envs / model.batch_size)


DQN_MATCHED = ("algo.hidden=[64, 64]", "learner.batch_size=32",
               "replay.samples_per_insert=8",  # 32 samples per 4 inserts: an update per 4 steps
               "replay.min_size_to_sample=1000",
               "algo.target_update_period=250")  # SB3's 1000 env steps at an update per 4

SAC_MATCHED = ("env.id='Pendulum-v1'", "env.num_envs=1", "algo.hidden=[256, 256]",
               "algo.actor_lr=1e-3", "algo.critic_lr=1e-3", "algo.alpha_lr=1e-3",
               "algo.random_steps=100", "learner.batch_size=256",
               "replay.samples_per_insert=256",  # 256 samples per insert: an update per env step
               "replay.min_size_to_sample=100")

SAC_HALFCHEETAH_MATCHED = ("env.id='HalfCheetah-v5'", "env.num_envs=1", "algo.hidden=[256, 256]",
                           "algo.actor_lr=3e-4", "algo.critic_lr=3e-4", "algo.alpha_lr=3e-4",
                           "algo.random_steps=100", "learner.batch_size=256",
                           "replay.samples_per_insert=256", "replay.capacity=1000000",
                           "replay.min_size_to_sample=100")

WORKLOADS = (
    Workload("DQN CartPole-v1, [64, 64], batch 32, an update per 4 env steps", "dqn", 30_000,
             "SB3 DQN, 1 gymnasium env", sb3_dqn_cartpole, sb3_updates, (
                 Variant("asyncrl, 8 envs, plain DQN (SB3's features)",
                         (*DQN_MATCHED, "algo.double=false", "algo.dueling=false", "algo.n_step=1")),
                 Variant("asyncrl, 8 envs, double dueling 3-step", DQN_MATCHED),
                 Variant("asyncrl, 8 envs, plain DQN, compiled update",
                         (*DQN_MATCHED, "algo.double=false", "algo.dueling=false", "algo.n_step=1",
                          "algo.compile=true")),
                 Variant("asyncrl, 8 envs, double dueling 3-step, compiled update",
                         (*DQN_MATCHED, "algo.compile=true")),
                 # The same learning work (network, batch, an update per 4 env steps) with the
                 # envs asyncrl would use: 64 in EnvPool's async mode, batches of 32 per hand-off.
                 Variant("asyncrl, 64 envs (async, batch 32), double dueling 3-step, compiled update",
                         (*DQN_MATCHED, "algo.compile=true", "env.num_envs=64", "env.batch_size=32")),
             )),
    # asyncrl's PPO preset is RL-Zoo's CartPole setting (8 envs x 32 steps, one 256-step
    # minibatch, gamma 0.98, lambda 0.8, lr 1e-3 annealed, no entropy bonus) with 10 epochs;
    # the matched row runs RL-Zoo's 20. A rollout's gradient steps are one asyncrl update.
    Workload("PPO CartPole-v1, RL-Zoo (8 envs, n_steps 32, batch 256, 20 epochs)", "ppo", 100_000,
             "SB3 PPO, 8 envs", sb3_ppo_cartpole, sb3_ppo_gradient_steps, (
                 Variant("asyncrl, 8 envs, 20 epochs (RL-Zoo's)",
                         ("env.id='CartPole-v1'", "env.num_envs=8", "algo.epochs=20"), 20),
                 Variant("asyncrl, 8 envs, 10 epochs (the preset)",
                         ("env.id='CartPole-v1'", "env.num_envs=8"), 10),
                 Variant("asyncrl, 8 envs, 20 epochs (RL-Zoo's), compiled gradient steps",
                         ("env.id='CartPole-v1'", "env.num_envs=8", "algo.epochs=20",
                          "algo.compile=true"), 20),
                 Variant("asyncrl, 8 envs, 10 epochs (the preset), compiled gradient steps",
                         ("env.id='CartPole-v1'", "env.num_envs=8", "algo.compile=true"), 10),
             )),
    Workload("SAC Pendulum-v1, [256, 256], batch 256, an update per env step", "sac", 5_000,
             "SB3 SAC, 1 gymnasium env", sb3_sac_pendulum, sb3_updates, (
                 Variant("asyncrl, 1 env", SAC_MATCHED),
                 Variant("asyncrl, 1 env, inline actor", (*SAC_MATCHED, "actors.placement='inline'")),
             )),
    # Needs MuJoCo for gymnasium on SB3's side (the bench extra installs gymnasium[mujoco]).
    Workload("SAC HalfCheetah-v5, [256, 256], batch 256, an update per env step", "sac", 3_000,
             "SB3 SAC, 1 gymnasium env", sb3_sac_halfcheetah, sb3_updates, (
                 Variant("asyncrl, 1 env", SAC_HALFCHEETAH_MATCHED),
                 Variant("asyncrl, 1 env, inline actor",
                         (*SAC_HALFCHEETAH_MATCHED, "actors.placement='inline'")),
             )),
)

MEASURE_ONLY = ("train.eval_every=1000000000", "train.checkpoint_every=1000000000",
                "train.target_return=1e9", "train.tensorboard=false")


# --- one measured run of each side --------------------------------------------------------------


def run_sb3(workload: Workload, steps: int, threads: int, seed: int) -> tuple[float, float, float]:
    from stable_baselines3.common.callbacks import BaseCallback

    class HalfWay(BaseCallback):
        """Stamps the time and step count when the run crosses half of its steps."""
        stamp: tuple[float, int] | None = None

        def _on_step(self) -> bool:
            if self.stamp is None and self.num_timesteps >= steps // 2:
                self.stamp = (time.perf_counter(), self.num_timesteps)
            return True

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = workload.sb3_model(seed)
        half = HalfWay()
        start = time.perf_counter()
        model.learn(total_timesteps=steps, callback=half)
        end = time.perf_counter()
        updates = workload.sb3_updates(model)
        model.get_env().close()
    finally:
        torch.set_num_threads(before)
    wall = end - start
    t_half, n_half = half.stamp or (start, 0)
    return model.num_timesteps / wall, updates / wall, (model.num_timesteps - n_half) / (end - t_half)


def run_asyncrl(workload: Workload, variant: Variant, steps: int, threads: int,
                seed: int) -> tuple[float, float, float]:
    overrides = [*MEASURE_ONLY, f"train.total_env_steps={steps}", f"train.seed={seed}",
                 f"learner.torch_threads={threads}", f"train.log_every={max(1, steps // 10)}",
                 *variant.overrides]
    config = build_config(registry.get(workload.algo).preset, overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        result = asyncio.run(Trainer(config, run_dir=run_dir).run())
        rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "charts/updates" in r]
    wall = result["train_wall_s"]
    half = next(r for r in rows if r["env_steps"] >= steps // 2)
    last = max(rows, key=lambda r: r["env_steps"])
    steady = (last["env_steps"] - half["env_steps"]) / max(last["wall_s"] - half["wall_s"], 1e-9)
    return (result["env_steps"] / wall, result["updates"] * variant.gradient_steps_per_update / wall,
            steady)


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: the SB3 side of a workload (variant None) or one asyncrl variant."""

    workload: Workload
    variant: Variant | None
    steps: int
    threads: int = 1
    probe: dict[int, float] | None = None  # slower probe's env steps/s at each thread count
    runs: list[tuple[float, float, float]] = field(default_factory=list)  # (env steps/s, updates/s, steady env steps/s)

    @property
    def label(self) -> str:
        return self.variant.label if self.variant else self.workload.sb3_label

    def measure(self, steps: int, threads: int, seed: int) -> tuple[float, float, float]:
        if self.variant is None:
            return run_sb3(self.workload, steps, threads, seed)
        return run_asyncrl(self.workload, self.variant, steps, threads, seed)

    def median(self, which: int) -> float:
        return statistics.median(r[which] for r in self.runs)


def pick_threads(rows: list[Row], probe_steps: int, fixed: int | None) -> None:
    """Two short runs at each thread count, interleaved; the count whose slower run is faster
    wins. The slower run, not the mean: on a shared 2-core box two torch threads are sometimes
    as fast and sometimes 5-20x slower (their OpenMP workers wait on a core someone else holds),
    and one lucky probe must not pick them."""
    if fixed is not None:
        for row in rows:
            row.threads = fixed
        return
    candidates = sorted({1, min(2, os.cpu_count() or 1)})
    print(f"picking torch threads: 2 runs of {probe_steps:,} env steps at each of {candidates}",
          flush=True)
    for row in rows:
        rates: dict[int, list[float]] = {t: [] for t in candidates}
        for _ in range(2):
            for t in candidates:
                rates[t].append(row.measure(probe_steps, t, 0)[0])
        row.probe = {t: min(r) for t, r in rates.items()}
        row.threads = max(row.probe, key=row.probe.get)
        shown = ", ".join(f"{t} thread{'s' * (t > 1)} {' / '.join(f'{x:,.0f}' for x in r)}"
                          for t, r in rates.items())
        print(f"  {row.label}: {shown} env steps/s -> {row.threads}", flush=True)


def print_table(rows: list[Row], repeats: int) -> None:
    print(f"\nenv steps/s and updates/s over whole runs, and env steps/s over their second halves "
          f"(steady), median of {repeats} interleaved repeats")
    print(f"{'setting':<46} {'threads':>7} {'env steps/s':>12} {'updates/s':>10} {'asyncrl/SB3':>12} "
          f"{'steady':>8} {'asyncrl/SB3':>12}")
    workload = None
    for row in rows:
        if row.workload is not workload:
            workload = row.workload
            print(workload.name)
            sb3_sps, sb3_steady = row.median(0), row.median(2)
        ratio = "" if row.variant is None else f"{row.median(0) / sb3_sps:.2f}x"
        steady = "" if row.variant is None else f"{row.median(2) / sb3_steady:.2f}x"
        print(f"  {row.label:<44} {row.threads:>7} {row.median(0):>12,.0f} {row.median(1):>10,.0f} "
              f"{ratio:>12} {row.median(2):>8,.0f} {steady:>12}")


def threads_arg(value: str) -> str | int:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError("expects 'auto' or a positive whole number")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="env steps per run (default: each workload's own, 30,000 for DQN)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="auto", type=threads_arg,
                        help="torch threads for every row, or 'auto': the faster of 1 and 2 per row")
    parser.add_argument("--probe-steps", type=int, default=10_000,
                        help="env steps of each thread-count probe (--threads auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--algos", default=None,
                        help="comma-separated asyncrl algorithms whose workloads run (default: all)")
    args = parser.parse_args()
    try:
        import stable_baselines3
    except ImportError:
        print('stable-baselines3 is not installed: pip install -e ".[bench]"', file=sys.stderr)
        sys.exit(2)
    fixed = None if args.threads == "auto" else args.threads
    logging.getLogger("asyncrl").setLevel(logging.WARNING)

    known = registry.names()
    rows: list[Row] = []
    wanted = set(args.algos.split(",")) if args.algos else None
    for workload in WORKLOADS:
        if wanted is not None and workload.algo not in wanted:
            continue
        if workload.algo not in known:
            print(f"skipped {workload.name.split(',')[0]}: asyncrl has no {workload.algo} yet")
            continue
        steps = args.steps or workload.default_steps
        rows += [Row(workload, None, steps), *(Row(workload, v, steps) for v in workload.asyncrl)]
    if not rows:
        return
    print(f"stable-baselines3 {stable_baselines3.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus", flush=True)
    pick_threads(rows, args.probe_steps, fixed)
    for repeat in range(args.repeats):  # interleaved: machine-load drift hits every row alike
        for row in rows:
            row.runs.append(row.measure(row.steps, row.threads, repeat + 1))
            print(f"  repeat {repeat + 1}/{args.repeats}: {row.label}: {row.runs[-1][0]:,.0f} env "
                  f"steps/s ({row.runs[-1][2]:,.0f} steady)", flush=True)
    print_table(rows, args.repeats)

    if args.json:
        out = {
            "command": " ".join(sys.argv), "repeats": args.repeats,
            "stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "rows": [{"workload": r.workload.name, "setting": r.label,
                      "side": "sb3" if r.variant is None else "asyncrl", "env_steps": r.steps,
                      "threads": r.threads, "thread_probe_env_steps_per_s": r.probe,
                      "env_steps_per_s": [x[0] for x in r.runs], "updates_per_s": [x[1] for x in r.runs],
                      "steady_env_steps_per_s": [x[2] for x in r.runs],
                      "median_env_steps_per_s": r.median(0), "median_updates_per_s": r.median(1),
                      "median_steady_env_steps_per_s": r.median(2)}
                     for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
