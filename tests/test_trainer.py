"""The trainer end to end on short runs: both modes, determinism, stop, cancel, resume, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from algos.dqn import DQN
from asyncrl import checkpoint
from asyncrl.config import ConfigError, build_config
from asyncrl.metrics import read_jsonl
from asyncrl.trainer import Trainer
from resume_checks import assert_resumed_from, newest, watch_first_update

SHORT = [
    "train.total_env_steps=3000", "replay.min_size_to_sample=500", "train.eval_every=1500",
    "train.eval_episodes=2", "train.log_every=500", "train.checkpoint_every=1500",
]
# Keys that measure time, not behaviour: they differ between identical runs.
TIMING = ("wall_s", "charts/sps", "charts/ups")


def config(*extra: str):
    return build_config(DQN.preset, overrides=[*SHORT, *extra])


def run(trainer: Trainer, timeout: float = 60) -> dict:
    return asyncio.run(asyncio.wait_for(trainer.run(), timeout))


def behaviour(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items()
             if k not in TIMING and not k.startswith("perf/") and not k.endswith("wait_s")} for row in rows]


def test_serial_mode_is_deterministic(tmp_path):
    results = []
    for name in ("a", "b"):
        trainer = Trainer(config("train.mode='serial'"), run_dir=tmp_path / name)
        run(trainer)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        _, _, state = checkpoint.load_latest(tmp_path / name / "checkpoints")
        results.append((behaviour(rows), state["algo"]["q"]))
    (rows_a, q_a), (rows_b, q_b) = results
    assert any("losses/td_loss" in r for r in rows_a) and any("eval/return_mean" in r for r in rows_a)
    assert rows_a == rows_b
    for key in q_a:
        assert torch.equal(q_a[key], q_b[key]), key


def test_async_run_finishes_with_checkpoint_and_no_leaked_threads(tmp_path):
    threads_before = threading.active_count()
    result = run(Trainer(config(), run_dir=tmp_path))
    assert result["env_steps"] >= 3000 and result["updates"] > 0
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all("env_steps" in r and "wall_s" in r for r in rows)
    assert any("eval/return_mean" in r for r in rows)
    assert any("queues/weight_staleness" in r for r in rows)
    path, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] == result["env_steps"]
    assert threading.active_count() == threads_before


def test_tensorboard_scalars_match_the_jsonl_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(Trainer(config("train.tensorboard=true"), run_dir=tmp_path))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    evals = events.Scalars("eval/return_mean")
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/return_mean" in r]
    assert [e.step for e in evals] == [r["env_steps"] for r in rows]
    assert [e.value for e in evals] == pytest.approx([r["eval/return_mean"] for r in rows])
    assert events.Scalars("charts/sps")[-1].step == result["env_steps"]


def test_async_mode_with_envpool_async_batches_and_two_actors(tmp_path):
    cfg = config("env.num_envs=8", "env.batch_size=4", "actors.num_actors=2", "replay.prioritized=true")
    trainer = Trainer(cfg, run_dir=tmp_path)
    result = run(trainer)
    assert result["env_steps"] >= 3000 and result["updates"] > 0
    replay = trainer.c.replay
    # Both actors delivered: actor i writes the streams of its envs, i * 8 .. i * 8 + 7.
    rows = replay.head.reshape(2, 8).sum(1)
    assert len(trainer.c.actors) == 2 and np.all(rows >= rows.sum() // 10), rows
    # Priorities moved: a slot enters at the largest priority seen so far (1 at first) and the
    # learner writes back its TD errors, so the stored values spread over many values below it.
    stored = replay.state_dict()["priorities"]
    stored = stored[stored > 0]  # the drawable slots
    assert replay.max_priority > 1.0 and len(np.unique(stored)) > 100
    assert np.mean(stored < replay.max_priority ** replay.priority_exponent) > 0.5


def test_stop_ends_a_run_cleanly(tmp_path):
    trainer = Trainer(config("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        while trainer.recorder is None or trainer.recorder.env_steps < 2000:
            await asyncio.sleep(0.05)
        trainer.stop()
        return await asyncio.wait_for(task, 10)

    result = asyncio.run(main())
    assert 2000 <= result["env_steps"] < 10_000_000
    assert checkpoint.checkpoints(tmp_path / "checkpoints")[0].name == f"step_{result['env_steps']:012d}"


@pytest.mark.parametrize("mode", ["async", "serial"])
def test_cancel_writes_final_checkpoint_and_joins_threads(tmp_path, mode):
    threads_before = threading.active_count()
    trainer = Trainer(config("train.total_env_steps=10_000_000", f"train.mode='{mode}'"), run_dir=tmp_path)

    stream = trainer.metrics()

    async def main():
        task = asyncio.create_task(trainer.run())
        while trainer.recorder is None or trainer.recorder.env_steps < 2000:
            await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=60)  # a hang guard, not a speed claim
        assert done and task.cancelled()
        rows = await asyncio.wait_for(_drain(stream), 10)  # the stream ends with the run
        return rows

    rows = asyncio.run(main())
    assert rows and rows[-1]["env_steps"] >= 2000
    # The final checkpoint holds the state the run was cancelled in, not an older periodic one.
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] == trainer.c.recorder.env_steps >= rows[-1]["env_steps"] >= 2000
    assert manifest["updates"] == trainer.c.recorder.updates > 0
    assert threading.active_count() == threads_before


async def _drain(stream) -> list[dict]:
    return [row async for row in stream]


def test_resume_continues_counters(tmp_path):
    first = run(Trainer(config(), run_dir=tmp_path))
    resumed = run(Trainer(config("train.total_env_steps=5000"), run_dir=tmp_path, resume=True))
    assert resumed["env_steps"] >= 5000
    assert resumed["updates"] > first["updates"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    later = [r for r in rows if r["env_steps"] > first["env_steps"]]
    assert later and all(r["wall_s"] >= first["wall_s"] for r in later)


def _kill_after_a_checkpoint(run_dir, *overrides: str) -> dict:
    """A CLI run (process actors, the CPU default) SIGKILLed once it has written a checkpoint;
    the newest checkpoint's manifest."""
    cmd = [sys.executable, "-m", "asyncrl", "run", "dqn", "--no-live", "--run-dir", str(run_dir),
           "--set", "train.total_env_steps=10_000_000", "--set", "train.checkpoint_every=2000",
           "--set", "replay.min_size_to_sample=500", "--set", "train.eval_every=1_000_000"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not checkpoint.checkpoints(run_dir / "checkpoints"):
            assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return checkpoint.load_latest(run_dir / "checkpoints")[1]


def test_a_fresh_run_refuses_a_run_directory_that_holds_a_run(tmp_path):
    first = run(Trainer(config("train.mode='serial'", "train.total_env_steps=600"), run_dir=tmp_path))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    rows = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run(Trainer(config("train.mode='serial'", "train.total_env_steps=600"), run_dir=tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "metrics.jsonl").read_text() == rows and first["env_steps"] >= 600


def test_sigkill_mid_run_then_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _kill_after_a_checkpoint(run_dir)
    manifest, state, replay = newest(run_dir)
    target = manifest["env_steps"] + 1500
    # Resumed in this process (to watch its first update) from the run's own config.json, with
    # inline actors: any placement resumes any other's checkpoint (its actors' RNG states
    # included), and a worker's start-up would only add seconds.
    cfg = build_config(file=run_dir / "config.json",
                       overrides=[f"train.total_env_steps={target}", "actors.placement='inline'"])
    trainer = Trainer(cfg, run_dir=run_dir, resume=True)
    seen = watch_first_update(monkeypatch, DQN, trainer, lambda algo: algo.epsilon(trainer.recorder.env_steps))
    summary = run(trainer, timeout=120)
    assert summary["env_steps"] >= target
    assert_resumed_from(seen, manifest, state, trainer, replay)
    # The exploration schedule goes on from the saved env steps, not from its start.
    eps = trainer.c.algo.epsilon
    assert seen["probe"] <= eps(manifest["env_steps"]) < eps(0)
    _, final, _ = checkpoint.load_latest(run_dir / "checkpoints")
    assert final["env_steps"] >= target and final["updates"] > manifest["updates"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["env_steps"] for r in rows if "charts/sps" in r]
    assert steps == sorted(steps), "env steps went backwards in metrics.jsonl"
    assert [r for r in rows if r["env_steps"] <= manifest["env_steps"]], "the killed run's rows are gone"


def test_a_resumed_run_holds_the_replay_limiter_counters_and_rngs_it_saved(tmp_path):
    run_dir = tmp_path / "run"
    manifest = _kill_after_a_checkpoint(run_dir)
    path = checkpoint.checkpoints(run_dir / "checkpoints")[0]
    saved = checkpoint.load_replay(path)
    assert saved is not None and "limiter" in manifest
    # A budget the checkpoint already reached: the run restores, evaluates and returns.
    trainer = Trainer(config(f"train.total_env_steps={manifest['env_steps']}"), run_dir=run_dir,
                      resume=True)
    run(trainer)
    c = trainer.c
    assert c.recorder.env_steps == manifest["env_steps"] and c.recorder.updates == manifest["updates"]
    assert c.replay.size == int(np.minimum(saved["head"], c.replay.stream_capacity).sum()) > 0
    filled = saved["positions"] >= 0
    assert np.array_equal(c.replay.obs[filled], saved["obs"][filled])
    assert np.array_equal(c.replay.rewards[filled], saved["rewards"][filled])
    assert c.limiter.state_dict() == manifest["limiter"]
    assert [a.rng_state() for a in c.actors] == [json.loads(s) for s in manifest["actor_rngs"]]
    # Every stream's last saved step is cut: its env starts a new episode after the resume.
    last = (c.replay.head - 1) % c.replay.stream_capacity
    assert not c.replay.applied[np.arange(c.replay.num_streams), last].any()


@pytest.mark.learning
def test_dqn_solves_cartpole_within_100k_steps(dqn_cartpole_serial):
    """Issue 2's bar: greedy return >= 475 over 20 episodes within 100k env steps (fixed seed)."""
    result, _, _ = dqn_cartpole_serial
    assert result["eval"]["eval/return_mean"] >= 475
    assert result["eval"]["eval/episodes"] == 20
    assert result["reached_target_at"] <= 100_000


@pytest.mark.learning
def test_a_resumed_dqn_run_learns_at_once_and_is_back_at_its_return(tmp_path, monkeypatch):
    """A resume continues with the networks, the replay and the limiter's counts it saved: the
    policy the resumed run publishes plays at the saved return before any update, and updates go
    on from the first batch (no fresh warm-up of replay.min_size_to_sample = 1000 env steps).

    (Not "is at the bar again within N more env steps": DQN at lr 2.5e-3 may dip for a few
    thousand steps after any point of a run, resumed or not; that made the test flaky.)"""
    common = ["train.eval_episodes=10", "train.tensorboard=false", "train.target_return=400"]
    first = run(Trainer(build_config(DQN.preset, overrides=[*common, "train.eval_every=5000"]),
                        run_dir=tmp_path), timeout=300)
    assert first["eval"]["eval/return_mean"] >= 400, first
    manifest, state, replay = newest(tmp_path)
    resumed = Trainer(build_config(DQN.preset, overrides=[
        *common, "train.eval_every=5000", "train.log_every=500",
        f"train.total_env_steps={first['env_steps'] + 1000}"]), run_dir=tmp_path, resume=True)
    seen = watch_first_update(monkeypatch, DQN, resumed)
    at_resume: list[float] = []
    start = Trainer._start

    def start_then_evaluate(self, recorder):  # the published policy, before any update
        start(self, recorder)
        network, _ = self._evals.pull()
        at_resume.extend(self._evals.returns(network))

    monkeypatch.setattr(Trainer, "_start", start_then_evaluate)
    run(resumed, timeout=120)
    assert_resumed_from(seen, manifest, state, resumed, replay)
    # A fresh network plays ~10-40 here; the saved one played >= 400 (other episodes: margin).
    assert np.mean(at_resume) >= 300, at_resume
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl")
            if "charts/updates" in r and first["env_steps"] < r["env_steps"] <= first["env_steps"] + 1000]
    assert rows and rows[-1]["charts/updates"] - first["updates"] >= 50, rows


def test_live_view_shows_progress(tmp_path):
    import io

    from rich.console import Console

    from asyncrl.live import LiveView

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    trainer = Trainer(config(), run_dir=tmp_path)

    async def main():
        view = asyncio.create_task(LiveView(trainer, console, period_s=0.1).run())
        try:
            await asyncio.wait_for(trainer.run(), 60)
        finally:
            view.cancel()
            await asyncio.gather(view, return_exceptions=True)

    asyncio.run(main())
    text = buffer.getvalue()
    for label in ("env steps/s", "updates", "episodic return", "loss", "replay fill",
                  "limiter waits", "weight staleness", "time shares", "last eval return"):
        assert label in text
    assert "3,0" in text  # the final frame shows the env steps reached (3,0xx of 3,000)


def test_learning_goes_on_during_an_evaluation_and_a_run_stopping_on_it_keeps_the_weights_it_played(
        tmp_path, monkeypatch):
    """With a target return the evaluation no longer pauses learning: the learner keeps a copy of
    the state evaluated and goes back to it when the run stops on that evaluation. The eval is
    held for 0.5 s (on the I/O thread) so that updates surely happen meanwhile."""
    from asyncrl.evaluator import Evaluator

    played: list[dict] = []
    returns = Evaluator.returns

    def slow_returns(self, network):
        played.append({k: v.clone() for k, v in network.state_dict().items()})
        out = returns(self, network)
        time.sleep(0.5)
        return out

    monkeypatch.setattr(Evaluator, "returns", slow_returns)
    cfg = build_config(DQN.preset, overrides=[
        "train.eval_every=2000", "train.eval_episodes=4", "train.target_return=1",
        "train.tensorboard=false", "replay.min_size_to_sample=500"])
    result = run(Trainer(cfg, run_dir=tmp_path))
    assert result["reached_target_at"] is not None and len(played) == 1
    manifest, state, _ = newest(tmp_path)
    # Updates ran during the evaluation (the run's count) and were undone (the algorithm's).
    assert manifest["updates"] > state["algo"]["updates"] > 0
    for name, tensor in played[0].items():
        assert torch.equal(state["algo"]["q"][name], tensor), name
