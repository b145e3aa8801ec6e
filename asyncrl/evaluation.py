"""Greedy evaluation on envs of its own: one episode per env, raw (unclipped) returns."""

from __future__ import annotations

import numpy as np
import torch

from asyncrl.actor import EnvStates, act_with_state
from asyncrl.core import Algorithm, actor_state_spec, split_actions
from asyncrl.envs import VecEnv


def evaluate(env: VecEnv, algo: Algorithm, network: torch.nn.Module, rng: np.random.Generator,
             max_steps: int = 1_000_000) -> list[float]:
    """Run the greedy policy until every env of ``env`` (a sync-mode pool) finished one episode."""
    n = env.num_envs
    returns = np.zeros(n, np.float64)
    finished = np.zeros(n, bool)
    spec = actor_state_spec(algo)
    states = EnvStates(spec, n) if spec else None
    starts = np.ones(n, bool)  # every env's next observation begins an episode
    env.async_reset()
    for _ in range(max_steps):
        step = env.recv()
        ids = step.env_ids
        returns[ids] += step.rewards * ~finished[ids]
        finished[ids] |= step.terminated | step.truncated
        if finished.all():
            return returns.tolist()  # the pool is reset again at the next evaluation
        with torch.inference_mode():
            if states is None:
                actions, _ = split_actions(algo.act(network, torch.from_numpy(step.obs), 0, rng, greedy=True))
            else:
                actions, _ = act_with_state(algo, network, step.obs, 0, rng, states, ids, starts[ids], greedy=True)
                starts[ids] = step.terminated | step.truncated
        env.send(actions, ids)
    raise RuntimeError(f"evaluation did not finish {n} episodes within {max_steps} steps")
