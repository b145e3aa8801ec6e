"""Denormal floats: learners update with them flushed to zero (their slow path cost SAC ~20% of its
learner time here), in the thread that updates, and leave the thread as they found it."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from algos.dqn import DQN
from algos.ppo import PPO
from asyncrl import Trainer
from asyncrl.learner import denormals_flushed, flushing_denormals

from test_trainer import SHORT

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                reason="this CPU cannot flush denormals (not x86 with SSE3)")


@pytest.fixture(autouse=True)
def ieee_denormals():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def test_a_denormal_survives_outside_and_is_flushed_inside():
    tiny = torch.tensor([1e-40])
    assert not flushing_denormals() and float(tiny * 1.0) > 0.0
    with denormals_flushed():
        assert flushing_denormals() and float(tiny * 1.0) == 0.0
    assert not flushing_denormals() and float(tiny * 1.0) > 0.0


def test_a_host_that_flushes_already_keeps_flushing():
    torch.set_flush_denormal(True)
    with denormals_flushed():
        pass
    assert flushing_denormals()


def test_disabled_changes_nothing():
    with denormals_flushed(enabled=False):
        assert not flushing_denormals()


def test_it_is_per_thread_and_restored_after_an_error():
    seen, go = [], threading.Event()

    def look() -> None:
        go.wait(10)
        seen.append(flushing_denormals())

    other = threading.Thread(target=look)  # running before the block: keeps its own setting
    other.start()
    with pytest.raises(RuntimeError):
        with denormals_flushed():
            go.set()
            other.join()
            raise RuntimeError("update failed")
    assert seen == [False]
    assert not flushing_denormals()


def record_flushing(monkeypatch, cls) -> list[bool]:
    """Wrap ``cls.update`` to record, per call, whether denormals were flushed in its thread."""
    real, seen = cls.update, []

    def update(self, batch):
        seen.append(flushing_denormals())
        return real(self, batch)

    monkeypatch.setattr(cls, "update", update)
    return seen


@pytest.mark.parametrize("mode", ["serial", "async"])
@pytest.mark.parametrize("flush", [True, False])
def test_off_policy_updates_run_as_learner_flush_denormal_says(tmp_path, monkeypatch, mode, flush):
    seen = record_flushing(monkeypatch, DQN)
    overrides = [*SHORT, "train.total_env_steps=1500", f"train.mode='{mode}'",
                 "actors.placement='inline'", f"learner.flush_denormal={str(flush).lower()}"]
    asyncio.run(asyncio.wait_for(Trainer.from_algo("dqn", overrides=overrides, run_dir=tmp_path).run(), 60))
    assert seen and set(seen) == {flush}
    assert not flushing_denormals()  # the loop's thread is left as it was


@pytest.mark.parametrize("flush", [True, False])
def test_on_policy_updates_run_as_learner_flush_denormal_says(tmp_path, monkeypatch, flush):
    seen = record_flushing(monkeypatch, PPO)
    overrides = ["train.total_env_steps=1024", "train.eval_every=100000", "train.checkpoint_every=100000",
                 "train.target_return=1e9", f"learner.flush_denormal={str(flush).lower()}"]
    asyncio.run(asyncio.wait_for(Trainer.from_algo("ppo", overrides=overrides, run_dir=tmp_path).run(), 60))
    assert seen and set(seen) == {flush}
    assert not flushing_denormals()
