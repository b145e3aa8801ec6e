"""DQN's maths on hand-made batches, its action selection, and the Pong config starting to train."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from algos.dqn import DQN, DQNConfig
from asyncrl.config import build_config
from asyncrl.core import EnvSpec, TransitionBatch
from asyncrl.trainer import Trainer
from asyncrl.weights import WeightStore

VECTOR = EnvSpec("test", (4,), np.dtype(np.float32), "discrete", 3, ())
FRAMES = EnvSpec("frames", (4, 84, 84), np.dtype(np.uint8), "discrete", 6, ())


def batch(n: int = 5, seed: int = 0) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        obs=torch.randn(n, 4, generator=g), actions=torch.randint(0, 3, (n,), generator=g),
        rewards=torch.randn(n, generator=g), discounts=torch.tensor([0.99 ** 3, 0.0, 0.99, 0.99 ** 2, 0.0])[:n],
        next_obs=torch.randn(n, 4, generator=g), weights=torch.ones(n))


@pytest.mark.parametrize("double", [True, False])
def test_td_target_matches_hand_computation(double):
    algo = DQN(VECTOR, DQNConfig(double=double), torch.device("cpu"))
    with torch.no_grad():  # make the target net differ from the online one
        for p in algo.target_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = batch()
    _, _, td_abs = algo.loss(b)
    with torch.no_grad():
        q = algo.q(b.obs)[torch.arange(5), b.actions]
        next_target = algo.target_q(b.next_obs)
        chooser = algo.q(b.next_obs) if double else next_target
        bootstrap = next_target[torch.arange(5), chooser.argmax(1)]
        expected = b.rewards + b.discounts * bootstrap
    torch.testing.assert_close(td_abs, (expected - q).abs())
    terminal = b.discounts == 0  # no bootstrap through a terminated episode: the reward alone
    assert terminal.sum() == 2
    torch.testing.assert_close(td_abs[terminal], (b.rewards - q).abs()[terminal])


def test_updates_fit_a_fixed_batch_and_copy_the_target():
    algo = DQN(VECTOR, DQNConfig(target_update_period=50, lr=1e-3), torch.device("cpu"))
    b = batch()
    first = float(algo.loss(b)[0].detach())
    for _ in range(49):
        algo.update(b)
    assert not all(torch.equal(t, o) for t, o in zip(algo.target_q.parameters(), algo.q.parameters()))
    metrics, priorities = algo.update(b)
    assert all(torch.equal(t, o) for t, o in zip(algo.target_q.parameters(), algo.q.parameters()))
    assert float(metrics["td_loss"]) < first
    assert priorities.shape == (5,) and torch.all(priorities >= 0)


def test_compiled_update_matches_the_eager_one():
    runs = []
    for compiled in (False, True):
        torch.manual_seed(3)
        algo = DQN(VECTOR, DQNConfig(compile=compiled, target_update_period=2), torch.device("cpu"))
        out = [algo.update(batch(seed=i)) for i in range(4)]
        runs.append((algo, out))
    (eager, eager_out), (compiled, compiled_out) = runs
    assert compiled._compiled.active, "compiling failed here: the eager fallback ran"
    for (m0, p0), (m1, p1) in zip(eager_out, compiled_out):
        torch.testing.assert_close(m1["td_loss"], m0["td_loss"])
        torch.testing.assert_close(m1["grad_norm"], m0["grad_norm"])
        torch.testing.assert_close(p1, p0)
    for a, b in zip(eager.q.parameters(), compiled.q.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager.target_q.parameters(), compiled.target_q.parameters()):
        torch.testing.assert_close(a, b)
    # Adam's state is torch's own: a compiled learner's checkpoint resumes an eager one and back.
    for key, value in eager.optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(compiled.optimizer.state_dict()["state"][0][key], value)
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))  # as from a file: no shared tensors
    eager_next, compiled_next = eager.update(batch(seed=9)), compiled.update(batch(seed=9))
    torch.testing.assert_close(compiled_next[1], eager_next[1])
    for a, b in zip(eager.q.parameters(), compiled.q.parameters()):
        torch.testing.assert_close(a, b)


def test_a_failed_compile_falls_back_to_eager_with_a_warning(failing_compile, caplog):
    algo = DQN(VECTOR, DQNConfig(compile=True), torch.device("cpu"))
    before = [p.clone() for p in algo.q.parameters()]
    metrics, _ = algo.update(batch())
    assert not algo._compiled.active and failing_compile in caplog.text
    assert "long details" not in caplog.text
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.q.parameters()))
    assert torch.isfinite(metrics["td_loss"])


def test_polyak_target_moves_part_way():
    algo = DQN(VECTOR, DQNConfig(target_update_period=1, tau=0.1), torch.device("cpu"))
    before = [p.clone() for p in algo.target_q.parameters()]
    algo.update(batch())
    for old, new, online in zip(before, algo.target_q.parameters(), algo.q.parameters()):
        torch.testing.assert_close(new, old + 0.1 * (online - old))


def test_epsilon_schedule_and_exploration():
    algo = DQN(VECTOR, DQNConfig(eps_start=1.0, eps_end=0.1, eps_decay_steps=1000), torch.device("cpu"))
    assert algo.epsilon(0) == 1.0 and algo.epsilon(500) == pytest.approx(0.55) and algo.epsilon(10**6) == pytest.approx(0.1)
    net = algo.make_acting_network()
    net.load_state_dict(algo.q.state_dict())
    obs = torch.randn(4000, 4)
    greedy = algo.act(net, obs, 0, np.random.default_rng(0), greedy=True)
    assert np.array_equal(greedy, algo.q(obs).argmax(1).numpy())
    explored = algo.act(net, obs, 10**6, np.random.default_rng(0))
    differs = np.mean(explored != greedy)
    assert 0.04 < differs < 0.1  # epsilon 0.1, a random action matches the greedy one 1/3 of the time


def test_nature_cnn_on_uint8_frames_and_weight_store_size():
    algo = DQN(FRAMES, DQNConfig(), torch.device("cpu"))
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert algo.q(frames).shape == (2, 6)
    store = WeightStore.for_module(algo.acting_network)
    store.publish(algo.acting_network)
    fresh = algo.make_acting_network()
    assert store.pull(fresh, 0) is not None
    torch.testing.assert_close(fresh(frames), algo.q(frames))


def test_continuous_actions_are_refused():
    spec = EnvSpec("c", (3,), np.dtype(np.float32), "continuous", 0, (1,), np.array([-2.0]), np.array([2.0]))
    with pytest.raises(ValueError, match="discrete"):
        DQN(spec, DQNConfig(), torch.device("cpu"))


def test_pong_config_starts_and_trains(tmp_path):
    cfg = build_config(file="configs/dqn_pong.toml", overrides=[
        "env.num_envs=4", "env.batch_size=2", "replay.capacity=2000", "replay.min_size_to_sample=200",
        "replay.samples_per_insert=4", "train.total_env_steps=600", "train.eval_every=100000",
        "train.eval_episodes=1", "env.eval_kwargs.max_episode_steps=100", "train.log_every=200",
        "train.tensorboard=false"])
    result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=tmp_path).run(), 240))
    assert result["env_steps"] >= 600 and result["updates"] > 0
    assert result["eval"]["eval/episodes"] == 1


def test_the_lunarlander_config_starts_trains_and_checkpoints(tmp_path):
    """configs/dqn_lunarlander.toml as a user starts from it (its budget cut short, the update
    left eager here: compiling it costs ~40 s on this box): LunarLander-v3's 8 observations
    and 4 actions, RL-Zoo's [256, 256], lr and batch, evaluated and checkpointed."""
    from pathlib import Path

    from asyncrl import checkpoint

    config_file = Path(__file__).resolve().parents[1] / "configs" / "dqn_lunarlander.toml"
    cfg = build_config(file=config_file, overrides=[
        "algo.compile=false", "replay.min_size_to_sample=300", "train.total_env_steps=1000",
        "train.eval_every=100000", "train.eval_episodes=1", "env.eval_kwargs.max_episode_steps=100",
        "train.tensorboard=false", "train.live=false"])
    assert (cfg.algo.params["hidden"], cfg.algo.params["lr"], cfg.learner.batch_size) == ([256, 256], 6.3e-4, 128)
    assert cfg.train.target_return == 200.0 and build_config(file=config_file).algo.params["compile"] is True
    trainer = Trainer(cfg, run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    assert trainer.c.spec.obs_shape == (8,) and trainer.c.spec.num_actions == 4
    assert result["env_steps"] >= 1000 and result["updates"] >= 1 and "eval/return_mean" in result["eval"]
    assert checkpoint.checkpoints(tmp_path / "checkpoints")
