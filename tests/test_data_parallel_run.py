"""Data-parallel learners in a run (learner.num_learners = 2, gloo on the CPU): DQN learns
CartPole; a run saved with 2 learners resumes with 1 (and back), optimiser state included; a
learner process that dies ends the run with one line naming its rank, within seconds; cancelling
a run stops every learner process; what cannot run data-parallel is refused in one line before
any process starts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncrl import checkpoint
from asyncrl.benchmark.synthetic import fill_replay
from asyncrl.config import ConfigError
from asyncrl.faults import RunError
from asyncrl.learner_group import LearnerGroup
from asyncrl.metrics import Recorder, read_jsonl
from asyncrl.registry import resolve_config
from asyncrl.trainer import Trainer
from asyncrl.wiring import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py (SAC's check reads it)

QUIET = ["train.tensorboard=false", "train.live=false", "learner.device='cpu'"]  # gloo, on any box


def trainer(run_dir: Path, *sets: str, resume: bool = False, algo: str = "dqn") -> Trainer:
    return Trainer(resolve_config(algo, overrides=[*QUIET, *sets]), run_dir=run_dir, resume=resume)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie until its parent (the fork server) reaps it: gone all the same
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1].startswith("Z")


async def wait_for_updates(t: Trainer, updates: int, timeout_s: float = 60.0) -> LearnerGroup:
    deadline = time.monotonic() + timeout_s
    while not (t.c and t.c.recorder.updates >= updates and t.c.learner.pids):
        assert time.monotonic() < deadline, "the run made no updates"
        await asyncio.sleep(0.05)
    assert isinstance(t.c.learner, LearnerGroup)
    return t.c.learner


def engine_updates(learners: int, chunks: list[int]) -> tuple[dict, list[np.ndarray]]:
    """The engine's learner over a replay of synthetic steps, seeded alike: a chunk of ``k``
    updates per entry; the algorithm's state after them and every priority written back."""
    config = resolve_config("dqn", overrides=[*QUIET, "train.mode='serial'", "replay.prioritized=true",
                                              "algo.max_grad_norm=0.5", f"learner.num_learners={learners}"])
    c = build(config, Recorder(10**9, []))
    written: list[np.ndarray] = []
    write_back = c.learner.draw.write_back
    c.learner.draw.write_back = lambda keys, p: (written.append(p.copy()), write_back(keys, p))
    try:
        fill_replay(c.replay, c.spec, 2000, np.random.default_rng(1))
        for k in chunks:
            drawn = c.learner.sample(k)
            c.learner._finish([keys for _, keys in drawn], c.learner._update([b for b, _ in drawn]))
        assert c.recorder.updates == sum(chunks)
        return c.learner.algo_state(), written
    finally:
        c.learner.close()
        for actor in c.actors:
            actor.close()


def test_two_learners_update_as_one_on_the_same_draws():
    """The same draws (one replay, seeded alike; priorities steer them): two learners, each on
    its half of every batch, end where one learner ends, to float rounding; their priorities
    come back in row order. Chunks of several updates, and more than a chunk's slabs hold."""
    chunks = [1, 4, 16, 3, 1]
    one, one_written = engine_updates(1, chunks)
    two, two_written = engine_updates(2, chunks)
    assert len(two_written) == len(one_written) == sum(chunks)
    for a, b in zip(one_written, two_written):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for name in ("q", "target_q"):
        for key, value in one[name].items():
            torch.testing.assert_close(two[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    assert adam_steps(two) == {float(sum(chunks))}


@pytest.mark.learning
def test_two_learners_learn_cartpole(tmp_path):
    """The preset (batch 128: 64 rows a learner), seed 0: a greedy evaluation reaches 450 within
    the preset's 100k env steps."""
    t = trainer(tmp_path, "learner.num_learners=2", "train.seed=0")
    start = time.monotonic()
    result = asyncio.run(asyncio.wait_for(t.run(), 150))
    returns = [r["eval/return_mean"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/return_mean" in r]
    print(f"2 learners: {time.monotonic() - start:.1f} s, {result['env_steps']} env steps, evals {returns}")
    assert max(returns) >= 450, returns
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "perf/allreduce" in r]
    assert rows, "no all-reduce time in the metric rows"


def algo_state(run_dir: Path) -> tuple[dict, dict]:
    _, manifest, state = checkpoint.load_latest(run_dir / "checkpoints")
    return manifest, state["algo"]


def adam_steps(state: dict) -> set[float]:
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


def test_resume_across_learner_counts(tmp_path):
    """2 learners -> 1 -> 2: each checkpoint holds the learners' state (Adam's step count is the
    run's update count: rank 0's state, not the loop's idle copy), and each resumed run goes on
    from it, its optimiser included."""
    budget = ["replay.min_size_to_sample=500", "train.eval_every=1000000", "train.target_return=inf"]
    asyncio.run(trainer(tmp_path, *budget, "learner.num_learners=2", "train.total_env_steps=4000").run())
    manifest, state = algo_state(tmp_path)
    first = manifest["updates"]
    assert first > 50 and adam_steps(state) == {float(first)} and state["updates"] == first

    asyncio.run(trainer(tmp_path, *budget, "learner.num_learners=1", "train.total_env_steps=7000",
                        resume=True).run())
    manifest, state = algo_state(tmp_path)
    second = manifest["updates"]
    assert second > first + 50 and adam_steps(state) == {float(second)} and state["updates"] == second

    t = trainer(tmp_path, *budget, "learner.num_learners=2", "train.total_env_steps=10000", resume=True)
    asyncio.run(t.run())
    manifest, state = algo_state(tmp_path)
    assert manifest["updates"] > second + 50 and adam_steps(state) == {float(manifest["updates"])}
    # every rank held the same weights: the loop's copy, loaded from rank 0, acts as published
    flat = torch.cat([p.detach().reshape(-1) for p in t.c.algo.acting_network.parameters()])
    torch.testing.assert_close(flat, t.c.store._flat, rtol=0, atol=0)


def test_a_learner_that_dies_ends_the_run_in_one_line(tmp_path):
    t = trainer(tmp_path, "learner.num_learners=2", "train.total_env_steps=10000000",
                "train.target_return=inf")

    async def main() -> tuple[float, list[int]]:
        task = asyncio.create_task(t.run())
        group = await wait_for_updates(t, 20)
        pids = group.pids
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RunError) as raised:
            await asyncio.wait_for(task, 30)
        assert "\n" not in str(raised.value)
        assert "learner rank 1" in str(raised.value) and "SIGKILL" in str(raised.value), raised.value
        return time.monotonic() - killed, pids

    elapsed, pids = asyncio.run(main())
    assert elapsed < 5.0, elapsed
    assert all(gone(pid) for pid in pids)


def test_cancelling_a_run_stops_every_learner(tmp_path):
    t = trainer(tmp_path, "learner.num_learners=2", "train.total_env_steps=10000000",
                "train.target_return=inf")

    async def main() -> list[int]:
        task = asyncio.create_task(t.run())
        pids = (await wait_for_updates(t, 20)).pids
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        return pids

    pids = asyncio.run(main())
    assert all(gone(pid) for pid in pids)
    assert checkpoint.checkpoints(tmp_path / "checkpoints"), "no final checkpoint"


@pytest.mark.parametrize("algo, sets, says", [
    ("dqn", ["learner.batch_size=127"], "divisible"),
    ("dqn", ["algo.compile=true"], "algo.compile = false"),
    ("sac", [], "algo.parallel_losses = false"),
    ("ppo", [], "on-policy"),
])
def test_what_cannot_run_data_parallel_is_refused_in_one_line(algo, sets, says):
    config = resolve_config(algo, overrides=[*QUIET, "learner.num_learners=2", *sets])
    with pytest.raises(ConfigError) as raised:
        build(config, Recorder(1000, []))
    assert says in str(raised.value) and "\n" not in str(raised.value), raised.value
