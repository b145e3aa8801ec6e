"""The replay and the rate limiter inside a real async run (DQN, process actors, prioritised
replay): the learner's sampling stays in the configured band of ``samples_per_insert``, priorities
written back land on the keys that were drawn, the importance exponent anneals to 1 and the loss
sees importance weights other than 1. One short run serves every assert."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from algos.dqn import DQN
from asyncrl.config import build_config
from asyncrl.learner import Learner
from asyncrl.replay import Replay
from asyncrl.trainer import Trainer

SAMPLES_PER_INSERT, BATCH, MIN_SIZE, ERROR_BUFFER, BETA0 = 4.0, 32, 500, 200.0, 0.4
TOTAL = 4000
OVERRIDES = [
    f"train.total_env_steps={TOTAL}", "actors.placement='process'", "train.mode='async'",
    "replay.prioritized=true", f"replay.importance_exponent={BETA0}",
    f"replay.samples_per_insert={SAMPLES_PER_INSERT}", f"replay.min_size_to_sample={MIN_SIZE}",
    f"replay.error_buffer={ERROR_BUFFER}", f"learner.batch_size={BATCH}", "train.eval_every=1000000",
    "train.eval_episodes=1", "train.checkpoint_every=1000000", "train.tensorboard=false",
]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """The run, and what its learner drew, wrote back and learnt from."""
    seen = {"drawn": [], "written": [], "betas": [], "weights": []}
    mp = pytest.MonkeyPatch()
    real_sample, real_update_priorities, real_update = Replay.sample, Replay.update_priorities, DQN.update

    def sample(self, batch_size, importance_exponent=0.0, batches=1):
        data = real_sample(self, batch_size, importance_exponent, batches)
        seen["betas"].append(importance_exponent)
        seen["drawn"].extend(np.split(data["keys"].copy(), batches))
        return data

    def update_priorities(self, keys, priorities):
        seen["written"].append((np.array(keys), np.abs(np.asarray(priorities, np.float64))))
        return real_update_priorities(self, keys, priorities)

    def update(self, batch):
        seen["weights"].append(batch.weights.clone())
        return real_update(self, batch)

    mp.setattr(Replay, "sample", sample)
    mp.setattr(Replay, "update_priorities", update_priorities)
    mp.setattr(DQN, "update", update)
    try:
        trainer = Trainer(build_config(DQN.preset, overrides=OVERRIDES),
                          run_dir=tmp_path_factory.mktemp("replay_in_run"))
        result = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    finally:
        mp.undo()
    return trainer, result, seen


def test_sampling_stays_in_the_band_of_samples_per_insert(watched):
    trainer, result, _ = watched
    c = trainer.c
    assert isinstance(c.learner, Learner) and result["updates"] > 0
    env_steps, samples = result["env_steps"], result["updates"] * BATCH
    # Measured from the run's own counters (not the limiter's): the adder inserts an observation's
    # row once the env's next one arrives, so a row goes in for every env step and for every
    # episode's first observation after an end (EnvPool's reset steps are no env steps), but for
    # the episodes whose reset step had not arrived when the run stopped (at most one per env).
    envs = c.config.env.num_envs * c.config.actors.num_actors
    rows = env_steps + c.recorder.episodes
    counted = c.limiter.state_dict()
    assert rows - envs <= counted["inserts"] <= rows and counted["samples"] == samples, (
        counted, env_steps, c.recorder.episodes, envs)
    # The limiter's guaranteed band (see RateLimiter): diff = inserts * spi - samples within
    # [spi * min_size - error_buffer, max(spi * min_size + error_buffer, ... + B) + N * spi].
    diff = rows * SAMPLES_PER_INSERT - samples
    low = SAMPLES_PER_INSERT * MIN_SIZE - ERROR_BUFFER
    high = SAMPLES_PER_INSERT * MIN_SIZE + max(ERROR_BUFFER, BATCH) + c.config.env.num_envs * 2 * SAMPLES_PER_INSERT
    assert low - envs * SAMPLES_PER_INSERT <= diff <= high + envs * SAMPLES_PER_INSERT, (diff, low, high)
    assert samples / env_steps == pytest.approx(SAMPLES_PER_INSERT, rel=0.5)


def test_priorities_written_back_land_on_the_keys_that_were_drawn(watched):
    trainer, _, seen = watched
    replay = trainer.c.replay
    assert seen["written"] and len(seen["written"]) == len(seen["drawn"])
    for (keys, _), drawn in zip(seen["written"], seen["drawn"]):
        assert np.array_equal(keys, drawn)
    # The last write to each live key is the tree's value there (priority + eps) ** alpha.
    last: dict[int, float] = {}
    for keys, priorities in seen["written"]:
        last.update(zip(keys.tolist(), priorities.tolist()))
    keys = np.array(list(last))
    positions, streams = np.divmod(keys, replay.num_streams)
    cols = positions % replay.stream_capacity
    live = replay.positions[streams, cols] == positions
    assert live.sum() > 100
    stored = replay.state_dict()["priorities"][replay._leaf(streams[live], cols[live])]
    expected = (np.array(list(last.values()))[live] + replay.priority_eps) ** replay.priority_exponent
    np.testing.assert_allclose(stored, expected, rtol=1e-6)
    assert len(set(np.round(expected, 6))) > 10  # the priorities differ: they are the TD errors


def test_importance_exponent_anneals_to_one_and_the_loss_sees_weights_other_than_one(watched):
    trainer, result, seen = watched
    betas = seen["betas"]
    assert betas == sorted(betas) and betas[0] >= BETA0
    # Linear in env steps from BETA0 to 1 at the run's budget.
    assert trainer.c.learner.draw.importance_exponent() == 1.0 and result["env_steps"] >= TOTAL
    assert betas[-1] == pytest.approx(BETA0 + (1 - BETA0) * min(1, result["env_steps"] / TOTAL), abs=0.05)
    weights = [w for w in seen["weights"]]
    assert all(float(w.max()) == pytest.approx(1.0) for w in weights)
    assert sum(bool((w < 0.99).any()) for w in weights) > len(weights) // 2
