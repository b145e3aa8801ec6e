"""What SAC and TD3 promise alike: the critic's and the policy's halves of an update give the same
numbers on two threads as on one, their HalfCheetah configs start and train, and each reaches
-250 on Pendulum-v1 within 20k env steps (fixed seed, serial)."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from algos.sac import SAC
from algos.td3 import TD3
from asyncrl.config import build_config
from asyncrl.trainer import Trainer

from test_sac import SPEC, batch

ALGOS = pytest.mark.parametrize("cls", [SAC, TD3], ids=["sac", "td3"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def updated(cls, parallel: bool, updates: int = 4):
    """A small ``cls`` after ``updates`` updates on fixed batches, and what each update returned."""
    torch.manual_seed(0)
    algo = cls(SPEC, cls.Config(hidden=[32, 32], parallel_losses=parallel), torch.device("cpu"))
    return algo, [algo.update(batch(seed=i)) for i in range(updates)]


@ALGOS
def test_critic_and_policy_halves_on_two_threads_give_the_same_numbers(cls):
    """parallel_losses only moves the critic's half of an update to a second thread: every
    tensor of the state (networks, targets, optimizer moments), the metrics and the priorities
    are bit-identical to running the halves in turn (four updates: TD3's delayed policy steps too)."""
    (one, one_rows), (two, two_rows) = updated(cls, False), updated(cls, True)
    assert two.parallel_losses and not one.parallel_losses

    def tensors(state):
        if isinstance(state, torch.Tensor):
            return [state]
        if isinstance(state, dict):
            return [t for v in state.values() for t in tensors(v)]
        return []

    pairs = list(zip(tensors(one.state_dict()), tensors(two.state_dict())))
    assert len(pairs) > 10 and all(torch.equal(a, b) for a, b in pairs)
    for (m1, p1), (m2, p2) in zip(one_rows, two_rows):
        assert torch.equal(p1, p2)
        assert all(torch.equal(torch.as_tensor(m1[k]), torch.as_tensor(m2[k])) for k in m1)


@ALGOS
@pytest.mark.parametrize("parallel", [True, False])
def test_the_critic_half_runs_on_its_own_thread_only_when_asked(cls, parallel, monkeypatch):
    algo = cls(SPEC, cls.Config(hidden=[32, 32], parallel_losses=parallel), torch.device("cpu"))
    real, threads = algo.critic_loss, []

    def critic_loss(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(algo, "critic_loss", critic_loss)
    for i in range(2):  # TD3's second update is a policy step
        algo.update(batch(seed=i))
    policy_step = threads[-1]
    assert (policy_step is not threading.current_thread()) == parallel
    assert not any(t.is_alive() for t in threads if t is not threading.current_thread())


@ALGOS
def test_an_error_in_the_critic_thread_reaches_the_caller(cls, monkeypatch):
    algo = cls(SPEC, cls.Config(hidden=[32, 32], parallel_losses=True), torch.device("cpu"))
    algo.updates = 1  # TD3: the next update is a policy step, which runs both halves

    def broken(*args, **kwargs):
        raise RuntimeError("critic exploded")

    monkeypatch.setattr(algo, "critic_loss", broken)
    with pytest.raises(RuntimeError, match="critic exploded"):
        algo.update(batch())


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
