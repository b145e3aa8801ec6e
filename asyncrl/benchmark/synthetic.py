"""The bench's synthetic data: random valid observations and actions for an :class:`EnvSpec`, a
batch of the kind an algorithm declares (transitions, sequences, trajectories) for the learning
ceiling, trajectories for the learner mode's rollout queue, and a replay filled through its own
``insert`` as an actor would fill it. Nothing here touches an env or the engine's wiring."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from asyncrl.core import (EnvSpec, SequenceBatch, SequenceData, StateSpec, TrajectoryBatch,
                          TrajectoryData, TransitionBatch, TransitionData)
from asyncrl.replay import Replay
from asyncrl.sequence import SequenceReplay


def synthetic_batch(spec: EnvSpec, data: Any, batch_size: int, device: torch.device,
                    rng: np.random.Generator, state_spec: StateSpec | None = None) -> Any:
    """A batch of the kind ``data`` asks for, with random valid contents, on ``device``
    (``state_spec``: the actor state a sequence starts from, zeros)."""
    if isinstance(data, TransitionData):
        terminal = rng.random(batch_size) < 0.01
        fields = {
            "obs": random_obs(spec, batch_size, rng),
            "actions": random_actions(spec, batch_size, rng),
            "rewards": rng.standard_normal(batch_size).astype(np.float32),
            "discounts": np.where(terminal, 0.0, data.gamma ** data.n_step).astype(np.float32),
            "next_obs": random_obs(spec, batch_size, rng),
            "weights": np.ones(batch_size, np.float32),
        }
        return TransitionBatch(**{k: torch.from_numpy(v).to(device) for k, v in fields.items()})
    if isinstance(data, TrajectoryData):
        fields, extras = synthetic_trajectories(spec, data, batch_size, rng)
        return TrajectoryBatch(**{k: torch.from_numpy(v).to(device) for k, v in fields.items()},
                               extras={k: torch.from_numpy(v).to(device) for k, v in extras.items()})
    if isinstance(data, SequenceData):
        fields, _ = synthetic_trajectories(spec, TrajectoryData(data.length, {}), batch_size, rng)
        fields["obs"] = fields["obs"][:-1]
        move = {k: torch.from_numpy(fields[k]).to(device) for k in
                ("obs", "actions", "rewards", "terminated", "truncated", "applied")}
        return SequenceBatch(**move, valid=torch.ones_like(move["applied"]),
                             state={name: torch.from_numpy(np.zeros((batch_size, *shape), dtype)).to(device)
                                    for name, (shape, dtype) in (state_spec or {}).items()},
                             weights=torch.ones(batch_size, device=device))
    raise NotImplementedError(f"bench has no synthetic batch for {type(data).__name__} yet")


def synthetic_trajectories(spec: EnvSpec, data: TrajectoryData, n: int, rng: np.random.Generator
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n`` random trajectories, time first, with a rare episode end (and its reset step)."""
    t = data.length
    terminated = rng.random((t, n)) < 0.01
    applied = np.ones((t, n), bool)
    applied[1:] = ~terminated[:-1]
    fields = {
        "obs": random_obs(spec, (t + 1) * n, rng).reshape(t + 1, n, *spec.obs_shape),
        "actions": random_actions(spec, t * n, rng).reshape(t, n, *spec.action_shape),
        "rewards": rng.standard_normal((t, n)).astype(np.float32),
        "terminated": terminated, "truncated": np.zeros((t, n), bool), "applied": applied,
        "weight_version": np.zeros(n, np.int64),
    }
    extras = {name: (-rng.random((t, n, *shape))).astype(dtype) for name, (shape, dtype) in data.extras.items()}
    return fields, extras


def fill_replay(replay: Replay | SequenceReplay, spec: EnvSpec, steps: int, rng: np.random.Generator) -> None:
    """About ``steps`` random steps through ``replay.insert``, one per stream per call, with a
    rare episode end (and its reset step, not applied) as an actor would insert them."""
    n = replay.num_streams
    shortest = replay.length + 2 if isinstance(replay, SequenceReplay) else replay.n_step + 2
    per_stream = min(replay.stream_capacity, max(-(-steps // n), shortest))
    streams = np.arange(n)
    # A few distinct observation blocks, reused: random Atari frames are slow to make.
    blocks = [random_obs(spec, n, rng) for _ in range(min(per_stream, 8))]
    not_truncated = np.zeros(n, bool)
    ended = np.zeros(n, bool)
    for i in range(per_stream):
        terminated = rng.random(n) < 0.01
        replay.insert(streams, blocks[i % len(blocks)], random_actions(spec, n, rng),
                      rng.standard_normal(n).astype(np.float32), terminated, not_truncated, ~ended)
        ended = terminated


def random_obs(spec: EnvSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    shape, dtype = (n, *spec.obs_shape), np.dtype(spec.obs_dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, min(int(np.iinfo(dtype).max), 255) + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def random_actions(spec: EnvSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform valid actions (an unbounded Box dimension: within [-1, 1])."""
    if spec.action_kind == "discrete":
        return rng.integers(spec.num_actions, size=n)
    low = np.where(np.isfinite(spec.action_low), spec.action_low, -1.0)
    high = np.where(np.isfinite(spec.action_high), spec.action_high, 1.0)
    return rng.uniform(low, high, size=(n, *spec.action_shape)).astype(np.float32)
