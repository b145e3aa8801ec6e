"""Process actors: training through shared-memory slots, clean stop and cancel, a killed worker."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading

import pytest

from algos.dqn import DQN
from asyncrl import checkpoint
from asyncrl.config import build_config
from asyncrl.process_actor import ActorDied, ProcessActor
from asyncrl.trainer import Trainer

SHORT = ["actors.placement='process'", "train.total_env_steps=3000", "replay.min_size_to_sample=500",
         "train.eval_every=1500", "train.eval_episodes=2", "train.checkpoint_every=1500",
         "train.tensorboard=false"]


def config(*extra: str):
    return build_config(DQN.preset, overrides=[*SHORT, *extra])


async def until_steps(trainer: Trainer, steps: int) -> None:
    while trainer.recorder is None or trainer.recorder.env_steps < steps:
        await asyncio.sleep(0.05)


def test_process_actors_train_and_leave_nothing_behind(tmp_path):
    threads = threading.active_count()
    trainer = Trainer(config("actors.num_actors=2", "env.num_envs=8", "env.batch_size=4"), run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 90))
    assert all(isinstance(a, ProcessActor) for a in trainer.c.actors)
    assert result["env_steps"] >= 3000 and result["updates"] > 0
    assert trainer.c.replay.size >= 3000  # every batch arrived through the slots
    assert max(a.weight_version for a in trainer.c.actors) > 1  # the workers pulled new weights
    assert not multiprocessing.active_children()
    assert threading.active_count() == threads


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_stop_and_cancel_end_the_workers(tmp_path, how):
    trainer = Trainer(config("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        await asyncio.wait_for(until_steps(trainer, 2000), 60)
        if how == "stop":
            trainer.stop()
            await asyncio.wait_for(task, 10)
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert not multiprocessing.active_children()
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] >= 2000


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
    trainer = Trainer(config("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        await asyncio.wait_for(until_steps(trainer, 1000), 60)
        os.kill(trainer.c.actors[0].pid, signal.SIGKILL)
        await asyncio.wait_for(task, 20)

    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(main())
    died = info.value.subgroup(ActorDied)
    assert died is not None
    assert str(died.exceptions[0]) == (
        f"actor 0 (pid {trainer.c.actors[0].pid}) died with exit code {-signal.SIGKILL}")
    assert not multiprocessing.active_children()
