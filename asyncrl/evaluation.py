"""Greedy evaluation on envs of its own: one episode per env, raw (unclipped) returns."""

from __future__ import annotations

import numpy as np
import torch

from asyncrl.core import Algorithm, split_actions
from asyncrl.envs import VecEnv


def evaluate(env: VecEnv, algo: Algorithm, network: torch.nn.Module, rng: np.random.Generator,
             max_steps: int = 1_000_000) -> list[float]:
    """Run the greedy policy until every env of ``env`` (a sync-mode pool) finished one episode."""
    n = env.num_envs
    returns = np.zeros(n, np.float64)
    finished = np.zeros(n, bool)
    env.async_reset()
    for _ in range(max_steps):
        step = env.recv()
        ids = step.env_ids
        returns[ids] += step.rewards * ~finished[ids]
        finished[ids] |= step.terminated | step.truncated
        if finished.all():
            return returns.tolist()  # the pool is reset again at the next evaluation
        with torch.inference_mode():
            actions, _ = split_actions(algo.act(network, torch.from_numpy(step.obs), 0, rng, greedy=True))
        env.send(actions, ids)
    raise RuntimeError(f"evaluation did not finish {n} episodes within {max_steps} steps")
