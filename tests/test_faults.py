"""Faults a run survives or stops on cleanly: non-finite updates, failing Gymnasium envs, checkpoint
writes that fail, an unwritable run directory."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import os
import re

import gymnasium
import numpy as np
import pytest
import torch

from algos.dqn import DQN
from asyncrl import ConfigError, RunError, Trainer, checkpoint
from asyncrl.envs import make_env
from asyncrl.faults import NonFiniteGuard
from asyncrl.learner import Learner
from asyncrl.metrics import read_jsonl

from test_trainer import SHORT

SERIAL = [*SHORT, "train.mode='serial'", "train.total_env_steps=2000", "train.checkpoint_every=1000"]


def run(trainer: Trainer, timeout: float = 120) -> dict:
    return asyncio.run(asyncio.wait_for(trainer.run(), timeout))


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state).all()) if state.is_floating_point() else True
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    return True


def poison_updates(monkeypatch, bad) -> None:
    """DQN updates whose weights and loss turn NaN when ``bad(call_index)``."""
    real, calls = DQN.update, [0]

    def update(self, batch):
        metrics, priorities = real(self, batch)
        calls[0] += 1
        if bad(calls[0]):
            with torch.no_grad():
                for p in self.q.parameters():
                    p.fill_(math.nan)
            metrics["td_loss"] = torch.tensor(math.nan)
        return metrics, priorities

    monkeypatch.setattr(DQN, "update", update)


# --- non-finite updates -------------------------------------------------------------------------


def test_guard_checks_every_metric_and_rolls_back():
    guard = NonFiniteGuard(max_in_a_row=3)
    assert guard.finite([{"a": 1.0, "b": torch.tensor(2.0)}])
    assert not guard.finite([{"a": 1.0}, {"a": torch.tensor(math.inf)}])
    assert not guard.finite([{"a": math.nan}])
    # Scalars of other dtypes and vector metrics are checked alongside the float32 scalars.
    ok = {"loss": torch.tensor(1.0), "n": torch.tensor(3), "td": torch.ones(4, dtype=torch.float64)}
    assert guard.finite([ok, ok])
    assert not guard.finite([ok, {**ok, "td": torch.tensor([1.0, math.nan], dtype=torch.float64)}])
    assert not guard.finite([ok, {**ok, "half": torch.tensor(math.inf, dtype=torch.float16)}])
    assert not guard.finite([{"td": torch.ones(2)}, {"loss": torch.tensor(math.nan)}])

    class Algo:
        def __init__(self):
            self.w = torch.ones(3)

        def state_dict(self):
            return {"w": self.w}

        def load_state_dict(self, state):
            self.w = state["w"].clone()

    algo = Algo()
    guard.before_chunk(algo)  # the first snapshot
    algo.w += 1  # a good update
    assert guard.check(algo, [{"loss": 1.0}]) and guard.skipped_updates == 0
    guard.before_chunk(algo)  # no new snapshot yet: one every 32 updates
    algo.w.fill_(math.nan)  # what a bad update does in place
    assert not guard.check(algo, [{"loss": math.nan}, {"loss": 1.0}])
    # Both updates of the chunk are skipped; the good one before it is lost with them.
    assert torch.equal(algo.w, torch.ones(3)) and guard.skipped_updates == 2
    # After a rollback, a snapshot before every chunk: a bad chunk costs only itself.
    guard.before_chunk(algo)
    algo.w += 1
    assert guard.check(algo, [{"loss": 1.0}]) and guard.in_a_row == 0
    guard.before_chunk(algo)
    algo.w.fill_(math.inf)
    assert not guard.check(algo, [{"loss": torch.tensor(math.inf)}])
    assert torch.equal(algo.w, torch.full((3,), 2.0))
    with pytest.raises(RunError, match="3 updates in a row"):
        guard.before_chunk(algo)
        guard.check(algo, [{"loss": math.nan}] * 2)


def test_a_batch_with_nan_rewards_leaves_dqn_as_it_was():
    from asyncrl.core import EnvSpec, TransitionBatch

    spec = EnvSpec("CartPole-v1", (4,), np.dtype(np.float32), "discrete", 2, ())
    algo = DQN(spec, DQN.Config(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)

    def batch(reward: float) -> TransitionBatch:
        return TransitionBatch(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g),
                               torch.full((32,), reward), torch.full((32,), 0.99),
                               torch.randn(32, 4, generator=g), torch.ones(32))

    guard = NonFiniteGuard(max_in_a_row=5, snapshot_every=2)
    for _ in range(3):  # snapshots before the 1st and the 3rd update
        guard.before_chunk(algo)
        assert guard.check(algo, [algo.update(batch(1.0))[0]])
    guard.before_chunk(algo)
    assert not guard.check(algo, [algo.update(batch(math.nan))[0]])
    # Back to the snapshot after two updates: the NaN update and the 3rd are not applied.
    assert all_finite(algo.state_dict()) and algo.updates == 2
    snapshot = {k: v.clone() for k, v in algo.q.state_dict().items()}
    guard.before_chunk(algo)
    assert guard.check(algo, [algo.update(batch(1.0))[0]])  # learning goes on from there
    assert all_finite(algo.state_dict()) and algo.updates == 3
    assert any(not torch.equal(v, snapshot[k]) for k, v in algo.q.state_dict().items())


def test_nonfinite_updates_are_skipped_counted_and_kept_out_of_the_weights(tmp_path, monkeypatch):
    poison_updates(monkeypatch, lambda i: i % 5 == 0)
    # The rows hold only the losses current at each log step (every 500 env steps), which a bad
    # update rarely is: also read the losses the learner reports after every chunk (one update
    # each in serial mode), which a bad update's would be if the guard let it through.
    reported, chunk = [], Learner._update

    def watched(self, batches):
        out = chunk(self, batches)
        if "td_loss" in self.recorder.losses:
            reported.append(float(self.recorder.losses["td_loss"]))
        return out

    monkeypatch.setattr(Learner, "_update", watched)
    result = run(Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    skipped = rows[-1]["charts/skipped_updates"]
    assert skipped > 0 and result["updates"] > skipped
    assert all(math.isfinite(loss) for loss in reported)
    assert len(reported) == result["updates"] + skipped  # a chunk per update, bad ones too
    losses = [r["losses/td_loss"] for r in rows if "losses/td_loss" in r]
    assert losses and all(loss is not None and math.isfinite(loss) for loss in losses)
    for path in checkpoint.checkpoints(tmp_path / "checkpoints"):
        assert all_finite(checkpoint.load(path)[1]["algo"])
    # Good updates lost to rollbacks: only those before the first bad one (then a snapshot per
    # chunk keeps each rollback to the bad update alone).
    applied = checkpoint.load_latest(tmp_path / "checkpoints")[2]["algo"]["updates"]
    assert result["updates"] - 4 == applied


def test_nonfinite_updates_in_a_row_stop_the_run_with_one_line_and_finite_checkpoints(tmp_path, monkeypatch):
    poison_updates(monkeypatch, lambda i: i > 150)  # after the first checkpoint (~60 updates)
    cfg = [*SERIAL, "train.total_env_steps=1_000_000", "learner.max_nonfinite_in_a_row=20"]
    with pytest.raises(RunError, match="20 updates in a row had a non-finite td_loss") as info:
        run(Trainer.from_algo("dqn", overrides=cfg, run_dir=tmp_path))
    assert "\n" not in str(info.value)
    found = checkpoint.checkpoints(tmp_path / "checkpoints")
    assert found and all(all_finite(checkpoint.load(p)[1]["algo"]) for p in found)


# --- Gymnasium envs that raise --------------------------------------------------------------------


class FlakyCartPole(gymnasium.Wrapper):
    """CartPole whose n-th ``step`` call raises when ``failing(n)``."""

    def __init__(self, failing):
        super().__init__(gymnasium.make("CartPole-v1"))
        self.failing, self.calls = failing, 0

    def step(self, action):
        self.calls += 1
        if self.failing(self.calls):
            raise RuntimeError("simulator crashed")
        return self.env.step(action)


def test_failing_env_is_reset_counted_and_logged_then_stops_the_run(caplog):
    rules = iter([lambda n: n == 2, lambda n: n >= 3])  # env 0 fails once; env 1 from its 3rd step on
    env = make_env("Flaky-v0", 2, seed=1, env_fn=lambda: FlakyCartPole(next(rules)), max_errors_in_a_row=2)
    zeros = np.zeros(2, np.int64)
    env.async_reset()
    ids = env.recv().env_ids
    env.send(zeros, ids)
    before = env.recv()  # step 1 of both
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        env.send(zeros, ids)
        step = env.recv()  # env 0 raises
    assert env.errors == 1
    assert step.truncated.tolist() == [True, False] and step.rewards[0] == 0
    np.testing.assert_array_equal(step.obs[0], before.obs[0])  # its last good observation
    assert "Flaky-v0 #0 raised RuntimeError: simulator crashed; resetting it" in caplog.text
    env.send(zeros, ids)
    step = env.recv()  # env 0 is reset (a new episode, like an auto-reset); env 1 raises
    assert step.truncated.tolist() == [False, True] and env.errors == 2
    with pytest.raises(RunError, match=r"env Flaky-v0 #1 failed 3 times in a row .*simulator crashed"):
        for _ in range(10):  # env 1: reset, fail, reset, fail: its resets do not end the streak
            env.send(zeros, ids)
            env.recv()
    env.close()


def test_a_run_survives_a_flaky_env_and_counts_the_errors(tmp_path):
    trainer = Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path,
                                env_fn=lambda: FlakyCartPole(lambda n: n % 97 == 0))
    result = run(trainer)
    assert result["env_steps"] >= 2000
    errors = read_jsonl(tmp_path / "metrics.jsonl")[-1]["charts/env_errors"]
    assert errors >= 10


def test_an_env_that_always_fails_stops_the_run_with_one_line(tmp_path):
    trainer = Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path,
                                env_fn=lambda: FlakyCartPole(lambda n: True))
    with pytest.raises(RunError, match="failed 4 times in a row"):
        run(trainer)


# --- checkpoint writes that fail, an unwritable run directory ---------------------------------------


def failing_saves(monkeypatch, fail) -> list[int]:
    """checkpoint.save raises ENOSPC for the calls where ``fail(call_index)``."""
    real, calls = checkpoint.save, []

    def save(directory, env_steps, *args, **kwargs):
        calls.append(env_steps)
        if fail(len(calls)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return real(directory, env_steps, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    return calls


def test_a_failed_checkpoint_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    calls = failing_saves(monkeypatch, lambda n: n == 1)
    with caplog.at_level(logging.ERROR, logger="asyncrl"):
        result = run(Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path))
    assert f"checkpoint at {calls[0]} env steps failed (No space left on device" in caplog.text
    assert len(calls) >= 2
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] == result["env_steps"]


def test_a_final_checkpoint_that_cannot_be_written_fails_the_run(tmp_path, monkeypatch):
    calls = failing_saves(monkeypatch, lambda n: n > 1)
    with pytest.raises(RunError, match="final checkpoint could not be written.*newest on disk is .*step_0"):
        run(Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path))
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] == calls[0] < calls[-1]  # the first one, untouched


def test_an_unwritable_run_directory_is_a_config_error_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    trainer = Trainer.from_algo("dqn", overrides=SERIAL, run_dir=tmp_path / "a_file" / "run")
    with pytest.raises(ConfigError, match="cannot write the run directory"):
        run(trainer)


def test_a_nonfinite_ppo_update_is_rolled_back_and_acting_goes_on(tmp_path, monkeypatch):
    """PPO's actors wait for new weights after each rollout: a rolled-back update must still
    release them (the restored weights are published), or the run would hang."""
    from algos.ppo import PPO

    real, calls = PPO.update, [0]

    def update(self, batch):
        metrics, priorities = real(self, batch)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                for p in self.acting_network.parameters():
                    p.fill_(math.nan)
            metrics = {**metrics, "loss": torch.tensor(math.nan)}
        return metrics, priorities

    monkeypatch.setattr(PPO, "update", update)
    overrides = ["train.total_env_steps=3000", "train.eval_every=1500", "train.eval_episodes=2",
                 "train.checkpoint_every=1500", "train.target_return=1e9"]
    result = run(Trainer.from_algo("ppo", overrides=overrides, run_dir=tmp_path), timeout=120)
    assert result["env_steps"] >= 3000 and calls[0] > 2
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["charts/skipped_updates"] == 1
    assert result["updates"] == calls[0] - 1
    for path in checkpoint.checkpoints(tmp_path / "checkpoints"):
        assert all_finite(checkpoint.load(path)[1]["algo"])


# --- envs that return inf or nan ------------------------------------------------------------------


class NonFiniteCartPole(gymnasium.Wrapper):
    """CartPole whose ``step`` returns nan in ``field`` ("reward" or "obs") from call ``start`` on,
    every ``every`` calls."""

    def __init__(self, field: str, start: int, every: int = 1):
        super().__init__(gymnasium.make("CartPole-v1"))
        self.field, self.start, self.every, self.calls = field, start, every, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.calls += 1
        if self.calls >= self.start and (self.calls - self.start) % self.every == 0:
            if self.field == "reward":
                reward = math.nan
            else:
                obs = obs.copy()
                obs[1] = math.inf
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize("algo, field, words", [("dqn", "reward", "reward (nan)"),
                                                 ("dqn", "obs", "observation (holding inf)"),
                                                 ("ppo", "reward", "reward (nan)")])
def test_an_env_returning_nan_stops_the_run_naming_the_env_when_it_arrives(tmp_path, algo, field, words):
    overrides = SERIAL if algo == "dqn" else ["train.total_env_steps=2000", "train.target_return=1e9"]
    trainer = Trainer.from_algo(algo, overrides=overrides, run_dir=tmp_path,
                                env_fn=lambda: NonFiniteCartPole(field, start=100))
    with pytest.raises(RunError, match=rf"^env CartPole-v1 #\d returned a non-finite {re.escape(words)} "
                                       r"after (\d+) env steps \(env.nonfinite = 'stop'") as err:
        run(trainer)
    assert "\n" not in str(err.value)
    # Stopped when it arrived: at the first env to reach its 100th step.
    assert int(re.search(r"after (\d+) env steps", str(err.value)).group(1)) <= 8 * 100


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_nonfinite_zero_replaces_counts_and_trains_on(tmp_path, algo, caplog):
    overrides = ([*SERIAL, "train.total_env_steps=1500"] if algo == "dqn"
                 else ["train.total_env_steps=1500", "train.target_return=1e9"])
    fields = itertools.cycle(["reward", "obs"])  # training and evaluation envs
    trainer = Trainer.from_algo(algo, overrides=[*overrides, "env.nonfinite='zero'"], run_dir=tmp_path,
                                env_fn=lambda: NonFiniteCartPole(next(fields), start=50, every=10))
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        result = run(trainer)
    assert result["env_steps"] >= 1500 and result["updates"] > 0
    assert sum(a.nonfinite_steps for a in trainer.c.actors) >= 1500 // 10 // 2
    assert "env CartPole-v1 returned inf or nan: replaced with 0" in caplog.text
    assert trainer.c.learner.guard.skipped_updates == 0
    assert all_finite(trainer.c.algo.state_dict())


class _Adder:
    """Records what an actor hands its adder."""

    def __init__(self):
        self.seen = []

    def pending(self, env_ids) -> int:
        return 0

    def observe(self, ids, obs, rewards, terminated, truncated) -> None:
        self.seen.append((obs.copy(), rewards.copy()))

    def record_actions(self, env_ids, actions) -> None:
        pass


@pytest.mark.parametrize("nonfinite", ["stop", "zero"])
def test_batches_from_worker_processes_are_checked_too(nonfinite):
    from asyncrl.actor import ActorBase
    from asyncrl.envs import Step
    from asyncrl.metrics import Recorder
    from asyncrl.ratelimit import RateLimiter

    actor = ActorBase(3, None, _Adder(), Recorder(1000, []))
    actor.env_id, actor.nonfinite = "Hostile-v0", nonfinite
    obs = np.array([[0.0, 1.0], [math.nan, 2.0], [3.0, 4.0]], np.float32)
    step = Step(obs, np.array([1.0, 1.0, -math.inf], np.float32), np.zeros(3, bool), np.zeros(3, bool),
                np.arange(3))
    ingest = actor.ingest(RateLimiter(1.0, 1, 10.0, 1), step, np.zeros(3, np.int64), None, 1)
    if nonfinite == "stop":
        with pytest.raises(RunError, match=r"^env Hostile-v0 #1 returned a non-finite observation"):
            asyncio.run(ingest)
        return
    asyncio.run(ingest)
    (obs_seen, rewards_seen), = actor.adder.seen
    np.testing.assert_array_equal(obs_seen, [[0, 1], [0, 2], [3, 4]])
    np.testing.assert_array_equal(rewards_seen, [1, 1, 0])
    assert actor.nonfinite_steps == 2
