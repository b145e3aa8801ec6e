"""The acting step's cost per batch size: one PolicyStep.act (observations in, actions out: the
host-to-device copy, the forward, the copy back) for a config's acting network, on the CPU (one
torch thread, as a local-inference worker runs it) and on CUDA when present. The figures feed
the on-paper frames/s estimate for central inference (BENCHMARKS.md).

    python bench/forward_time.py [--config configs/dqn_pong.toml] [--batches 8,64,128,256]

Prints one line per device and batch: median microseconds per call over --repeats rounds of
--calls calls, and the env steps per second one such stream of calls could serve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from asyncrl.acting import PolicyStep
from asyncrl.config import build_config
from asyncrl.wiring import make_algo, probe_spec


def time_calls(policy: PolicyStep, obs: np.ndarray, calls: int, repeats: int, sync) -> float:
    """Median seconds per ``policy.act`` over ``repeats`` rounds of ``calls`` calls."""
    ids = np.arange(len(obs))
    for _ in range(5):  # warm-up: allocator, cuDNN's algorithm choice
        policy.act(obs, ids, 10**9)
    sync()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            policy.act(obs, ids, 10**9)  # actions come back as numpy: each call ends synchronised
        rounds.append((time.perf_counter() - t0) / calls)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dqn_pong.toml")
    parser.add_argument("--batches", default="8,64,128,256")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = build_config(file=args.config)
    spec = probe_spec(config)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        torch.set_num_threads(1)
        algo = make_algo(config, spec, device)
        policy = PolicyStep(algo, max(int(b) for b in args.batches.split(",")), np.random.default_rng(0))
        policy.network.to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for batch in (int(b) for b in args.batches.split(",")):
            obs = np.random.default_rng(0).integers(0, 255, (batch, *spec.obs_shape)).astype(spec.obs_dtype)
            s = time_calls(policy, obs, args.calls, args.repeats, sync)
            rows.append({"device": str(device), "batch": batch, "us_per_call": s * 1e6,
                         "env_steps_per_s": batch / s})
            print(f"{config.algo.name} {config.env.id} {device}: batch {batch:4d}  {s * 1e6:9.0f} us/call  "
                  f"{batch / s:10,.0f} env steps/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "obs_shape": list(spec.obs_shape), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
