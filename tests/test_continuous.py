"""What SAC and TD3 promise alike: their HalfCheetah configs start and train, and each reaches
-250 on Pendulum-v1 within 20k env steps (fixed seed, serial)."""

from __future__ import annotations

import asyncio
import math

import pytest

from algos.sac import SAC
from algos.td3 import TD3
from asyncrl.config import build_config
from asyncrl.trainer import Trainer

ALGOS = pytest.mark.parametrize("cls", [SAC, TD3], ids=["sac", "td3"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@ALGOS
def test_halfcheetah_config_starts_and_trains(tmp_path, cls):
    name = cls.preset["algo"]["name"]
    cfg = build_config(file=f"configs/{name}_halfcheetah.toml", overrides=[
        "replay.min_size_to_sample=500", "algo.random_steps=500", "train.total_env_steps=800",
        "train.eval_every=100000", "train.eval_episodes=1", "train.tensorboard=false",
        "env.eval_kwargs.max_episode_steps=50", "actors.placement='inline'"])
    assert cfg.algo.name == name and cfg.env.id == "HalfCheetah-v5"
    assert cfg.algo.hidden == [256, 256] and cfg.learner.batch_size == 256
    assert cfg.replay.capacity == 1_000_000
    assert cfg.train.target_return == math.inf  # the Pendulum preset's -200 does not leak in
    result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=tmp_path).run(), 180))
    assert result["env_steps"] >= 800 and result["updates"] > 0


@pytest.mark.learning
@ALGOS
def test_solves_pendulum_within_20k_steps(tmp_path, cls):
    """Greedy mean return >= -250 over 10 episodes within 20k env steps (fixed seed, serial)."""
    cfg = build_config(cls.preset, overrides=[
        "train.mode='serial'", "train.seed=0", "train.target_return=-250",
        "train.total_env_steps=20000", "train.tensorboard=false"])
    result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=tmp_path).run(), 300))
    assert result["eval"]["eval/return_mean"] >= -250
    assert result["eval"]["eval/episodes"] == 10
    assert result["reached_target_at"] <= 20_000
