"""What every resume test asserts: the resumed run starts from its checkpoint.

A run that restarts from step 0 (or from fresh networks, or an empty replay) still reaches a larger
budget with more updates; these checks tell it apart. They watch the algorithm's first update of
the resumed run (the learner calls ``algo.update`` in this process whatever the actors' placement)
and compare it with the checkpoint the run resumed from.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from asyncrl import checkpoint


def newest(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The newest checkpoint's manifest, state and replay (None when it holds none)."""
    path, manifest, state = checkpoint.load_latest(Path(run_dir) / "checkpoints")
    return manifest, state, checkpoint.load_replay(path)


def watch_first_update(monkeypatch, algo_cls: type, trainer, probe: Callable[[Any], Any] | None = None
                       ) -> dict[str, Any]:
    """Fills (at the resumed run's first update, before it) the algorithm's state, the recorder's
    counters and ``probe(algo)`` (a schedule's value, say) into the dict it returns."""
    seen: dict[str, Any] = {}
    original = algo_cls.update

    def update(self, *args, **kwargs):
        if not seen:
            seen.update(state=copy.deepcopy(self.state_dict()), env_steps=trainer.recorder.env_steps,
                        updates=trainer.recorder.updates, probe=probe(self) if probe else None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(algo_cls, "update", update)
    return seen


def assert_equal_state(actual: Any, saved: Any, where: str = "algo") -> None:
    """Nested state dicts hold the same tensors and values."""
    if isinstance(saved, dict):
        assert set(actual) == set(saved), where
        for key in saved:
            assert_equal_state(actual[key], saved[key], f"{where}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(actual) == len(saved), where
        for i, (a, s) in enumerate(zip(actual, saved)):
            assert_equal_state(a, s, f"{where}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(actual.cpu(), saved.cpu()), where
    elif isinstance(saved, np.ndarray):
        assert np.array_equal(actual, saved), where
    else:
        assert actual == saved, where


def assert_resumed_from(seen: dict[str, Any], manifest: dict[str, Any], state: dict[str, Any],
                        trainer=None, replay: dict[str, Any] | None = None) -> None:
    """The first update after the resume saw the checkpoint's networks, optimiser and counters;
    the replay (when ``replay`` is given) still holds every saved step at its place."""
    assert seen, "the resumed run made no update"
    assert seen["updates"] == manifest["updates"] > 0
    assert seen["env_steps"] >= manifest["env_steps"] > 0
    assert_equal_state(seen["state"], state["algo"])
    if replay is not None:
        filled = replay["positions"] >= 0
        assert filled.sum() > 0
        # The resumed run inserts after each stream's saved head; budgets here never wrap it.
        now = trainer.c.replay
        differ = filled & (now.obs != replay["obs"]).reshape(*filled.shape, -1).any(axis=-1)
        streams, cols = np.nonzero(differ)
        assert not differ.any(), (f"{differ.sum()} saved steps changed after the resume: streams "
                                  f"{streams[:8]}, positions {replay['positions'][streams, cols][:8]}, "
                                  f"now {now.positions[streams, cols][:8]}, saved heads {replay['head']}")
        assert np.array_equal(now.positions[filled], replay["positions"][filled])


def one_batch_from_rng_state(c, actor, state: dict, env_steps: int = 50_000
                             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Give ``actor`` (of the built run ``c``, an actor whose batches the loop ingests) the RNG
    ``state`` and a resumed run's env steps, let it take one batch in, and return the actions it
    chose, those a fresh RNG of that state picks on the same observations at those env steps,
    and that RNG's state after. The caller closes the actor."""
    actor.set_rng_state(state)
    assert actor.rng_state() == state
    c.recorder.env_steps = env_steps  # a resumed run's: its epsilon, not step 0's
    seen = []
    ingest = actor.ingest

    async def ingest_and_keep(limiter, step, actions, *args):
        seen.append((step.obs.copy(), actions.copy()))
        await ingest(limiter, step, actions, *args)

    actor.ingest = ingest_and_keep
    asyncio.run(asyncio.wait_for(actor.run(c.limiter, lambda: True), 60))  # one batch in
    (obs, actions), = seen
    return (actions, *_picked(c, obs, state, env_steps))


def first_batch_written_from_rng_state(c, actor, state: dict, env_steps: int = 50_000
                                       ) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """:func:`one_batch_from_rng_state` for an actor that writes into the replay itself (a
    process actor, all of its envs in each batch): its first batch's observations and actions
    are in the replay once the second batch is in. Returns those actions, the fresh RNG's
    actions and state after the first batch, and the actor's RNG state as of its first batch."""
    actor.set_rng_state(state)
    assert actor.rng_state() == state
    c.recorder.env_steps = env_steps
    taken = []

    def on_steps() -> bool:
        taken.append(actor.rng_state())
        return len(taken) == 2

    asyncio.run(asyncio.wait_for(actor.run(c.limiter, on_steps), 60))
    streams = actor._streams
    obs, actions = c.replay.obs[streams, 0], c.replay.actions[streams, 0]
    return (actions, *_picked(c, obs, state, env_steps), taken[0])


def _picked(c, obs: np.ndarray, state: dict, env_steps: int) -> tuple[np.ndarray, dict]:
    """The actions a fresh RNG of ``state`` picks on ``obs`` at ``env_steps``, and its state after."""
    from asyncrl.core import split_actions

    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(state)
    with torch.inference_mode():
        expected, _ = split_actions(c.algo.act(c.algo.acting_network, torch.from_numpy(obs), env_steps, rng))
    return expected, rng.bit_generator.state
