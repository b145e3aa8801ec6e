"""Greedy evaluation on envs of its own: one episode per env, raw (unclipped) returns."""

from __future__ import annotations

import numpy as np
import torch

from asyncrl.acting import PolicyStep
from asyncrl.core import Algorithm
from asyncrl.envs import VecEnv


def evaluate(env: VecEnv, algo: Algorithm, network: torch.nn.Module, rng: np.random.Generator,
             max_steps: int = 1_000_000) -> list[float]:
    """Run the greedy policy until every env of ``env`` (a sync-mode pool) finished one episode."""
    n = env.num_envs
    returns = np.zeros(n, np.float64)
    finished = np.zeros(n, bool)
    policy = PolicyStep(algo, n, rng, greedy=True, network=network)
    env.async_reset()
    for _ in range(max_steps):
        step = env.recv()
        ids = step.env_ids
        returns[ids] += step.rewards * ~finished[ids]
        finished[ids] |= step.terminated | step.truncated
        if finished.all():
            return returns.tolist()  # the pool is reset again at the next evaluation
        env.send(policy.act(step.obs, ids, 0, step.terminated, step.truncated).actions, ids)
    raise RuntimeError(f"evaluation did not finish {n} episodes within {max_steps} steps")
