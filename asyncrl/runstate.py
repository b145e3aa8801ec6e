"""A run's state as a checkpoint holds it, and back: :func:`snapshot` takes it from a built run
(counters, config, every actor's RNG, the algorithm's tensors and, when asked, the replay's
arrays and the limiter's counts); :func:`restore` puts a checkpoint into a freshly built run,
raising when it does not fit, so that :func:`asyncrl.checkpoint.load_latest` passes it over.
The files themselves are :mod:`asyncrl.checkpoint`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncrl import checkpoint
from asyncrl.policy import spec_to_dict
from asyncrl.ratelimit import RateLimiter
from asyncrl.wiring import Components

# train.replay_checkpoint_every = None saves a replay up to this size with every checkpoint.
AUTO_REPLAY_CHECKPOINT_BYTES = 512 * 2**20


def replay_checkpoint_every(c: Components) -> int:
    """How many checkpoints apart the replay is saved; 0: never. Never for on-policy runs, whose
    queue holds only trajectories not yet learned from."""
    every = c.config.train.replay_checkpoint_every
    if not isinstance(c.limiter, RateLimiter) or every == 0:
        return 0
    if every is None:
        nbytes = sum(v.nbytes for v in c.replay.state_dict().values() if isinstance(v, np.ndarray))
        return 1 if nbytes <= AUTO_REPLAY_CHECKPOINT_BYTES else 0
    return every


def snapshot(c: Components, with_replay: bool
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(manifest, tensors, replay or None), taken between updates (the caller holds the
    learner's lock or runs serially)."""
    rec = c.recorder
    manifest = {
        "env_steps": rec.env_steps, "updates": rec.updates, "episodes": rec.episodes,
        "wall_s": rec.wall_s, "weight_version": c.store.version,
        "config": c.config.to_dict(), "env_spec": spec_to_dict(c.spec),
        # JSON text: a PCG64 state holds 128-bit integers, which msgpack cannot.
        "actor_rngs": [json.dumps(a.rng_state()) for a in c.actors],
    }
    state = {"algo": to_cpu(c.algo.state_dict()), "torch_rng": torch.get_rng_state()}
    replay = None
    if with_replay:
        # Copies: the loop goes on inserting while the I/O thread writes them.
        replay = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in c.replay.state_dict().items()}
        manifest["limiter"] = c.limiter.state_dict()
    return manifest, state, replay


def restore(c: Components, path: Path, manifest: dict[str, Any], state: dict[str, Any],
            with_replay: bool) -> bool:
    """Load checkpoint ``path`` into the built run ``c``; whether it held a replay (restored).
    Raises (KeyError, ValueError, RuntimeError) when it does not fit this run, before the replay
    is written; a later, older checkpoint's restore overwrites whatever this one set."""
    c.algo.load_state_dict(state["algo"])
    torch.set_rng_state(state["torch_rng"])
    rngs = manifest.get("actor_rngs", [])
    if rngs and len(rngs) != len(c.actors):
        raise ValueError(f"it holds {len(rngs)} actors' RNG states for {len(c.actors)} actors")
    replay = checkpoint.load_replay(path) if with_replay else None
    if replay is not None:
        limiter = manifest["limiter"]
        c.replay.load_state_dict(replay)
        c.limiter.load_state_dict(limiter)
        # The envs start new episodes: no return may run from a saved step into them.
        c.replay.cut(np.arange(c.config.num_streams))
    for actor, rng_state in zip(c.actors, rngs):
        actor.set_rng_state(json.loads(rng_state))
    c.recorder.resume_at(manifest["env_steps"], manifest["updates"], manifest["episodes"], manifest["wall_s"])
    c.store.publish(c.algo.acting_network)
    return replay is not None


def to_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict on the CPU, safe to write while training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
