"""Remote (Ray) actors beside the single-node backend: env steps/s of the DQN trainer on CartPole-v1
with 1, 2 and 4 remote actors, and the bytes shipped to the learner per env step.

    pip install -e ".[ray]"
    python bench/ray_actors.py [--steps 20000] [--nodes 2]

The remote actors run on a real multi-node Ray cluster started here on loopback (one head node
that hosts no actor, ``--nodes`` nodes offering the resource ``worker``), so every batch crosses
a process and node boundary as it would between machines, without the network's own cost.
Two settings: the DQN preset (an update per 8 env steps: the learner sets the pace on a small
box) and an acting-bound one (samples per insert 0.25: the learner barely runs, so the figure
is what actors and ingestion can deliver). Evaluation is off: training throughput only.

Env steps/s are the steady rate, from the metrics rows past the first quarter of the run: worker
processes and remote actors take seconds to start (torch and EnvPool imports), which on a short
run would otherwise weigh more than the stepping.

Bytes per env step: batch payload received by the loop (observations, rewards, flags, env ids,
actions, versions, timings) plus the weight objects the remote actors fetched, over env steps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from algos.dqn import DQN  # noqa: E402
from asyncrl.config import build_config  # noqa: E402
from asyncrl.metrics import read_jsonl  # noqa: E402
from asyncrl.trainer import Trainer  # noqa: E402

SETTINGS = {"DQN preset (spi 16)": [], "acting-bound (spi 0.25)": ["replay.samples_per_insert=0.25"]}


def run(steps: int, extra: list[str]) -> dict:
    overrides = [f"train.total_env_steps={steps}", "train.eval_every=100000000",
                 "train.checkpoint_every=100000000", "train.target_return=1e9",
                 "train.tensorboard=false", "train.log_every=1000", *extra]
    config = build_config(DQN.preset, overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir=run_dir)
        result = asyncio.run(trainer.run())
        rows = [r for r in read_jsonl(f"{run_dir}/metrics.jsonl") if "charts/sps" in r]
    # The steady part: past the first quarter, up to the last row logged while training (the
    # run's final row comes after its final evaluation).
    first = next(r for r in rows if r["env_steps"] >= steps // 4)
    last = [r for r in rows if r["wall_s"] <= result["train_wall_s"]][-1]
    dt = last["wall_s"] - first["wall_s"]
    row = {"sps": (last["env_steps"] - first["env_steps"]) / dt,
           "ups": (last["charts/updates"] - first["charts/updates"]) / dt}
    if trainer.c.remote is not None:
        weight_bytes = trainer.c.remote.broadcast.nbytes
        batches = sum(a.bytes_received for a in trainer.c.actors)
        weights = sum(a.weight_fetches for a in trainer.c.actors) * weight_bytes
        row.update(batch_bytes=batches / result["env_steps"], weight_bytes=weights / result["env_steps"],
                   puts=trainer.c.remote.broadcast.puts, versions=trainer.c.store.version)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (each fits 2 actors)")
    args = parser.parse_args()
    logging.getLogger("asyncrl").setLevel(logging.WARNING)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=2, resources={"worker": 2}, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, include_dashboard=False, logging_level=logging.WARNING)
        remote = ["actors.backend='ray'", "actors.ray.resources={worker=1}"]
        rows = []
        for setting, extra in SETTINGS.items():
            for label, backend in (("local, 1 process actor", ["actors.placement='process'"]),
                                   ("local, 2 process actors", ["actors.placement='process'",
                                                                "actors.num_actors=2"]),
                                   ("ray, 1 remote actor", [*remote, "actors.num_actors=1"]),
                                   ("ray, 2 remote actors", [*remote, "actors.num_actors=2"]),
                                   ("ray, 4 remote actors", [*remote, "actors.num_actors=4"])):
                rows.append((setting, label, run(args.steps, [*backend, *extra])))
                print(f"  done: {setting}, {label}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{'setting':<26} {'backend':<26} {'env steps/s':>11} {'updates/s':>9} "
          f"{'B/step batches':>14} {'B/step weights':>14} {'puts/versions':>13}")
    for setting, label, r in rows:
        extra = (f"{r['batch_bytes']:>14.1f} {r['weight_bytes']:>14.1f} {r['puts']:>6}/{r['versions']:<6}"
                 if "batch_bytes" in r else f"{'-':>14} {'-':>14} {'-':>13}")
        print(f"{setting:<26} {label:<26} {r['sps']:>11,.0f} {r['ups']:>9,.0f} {extra}")


if __name__ == "__main__":
    main()
