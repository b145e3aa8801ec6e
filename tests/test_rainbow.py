"""Rainbow: the C51 projection against hand-computed cases, the loss against its definition, noisy
layers, acting, checkpointing, its configs, the trainer end to end and a learning check."""

from __future__ import annotations

import asyncio
import copy
import io

import numpy as np
import pytest
import torch

from algos.nets import NoisyLinear
from algos.rainbow import Rainbow, RainbowConfig, project_distribution
from asyncrl import registry
from asyncrl.config import ConfigError, build_config
from asyncrl.core import EnvSpec, TransitionBatch
from asyncrl.metrics import read_jsonl
from asyncrl.trainer import Trainer
from asyncrl.weights import WeightStore
from resume_checks import assert_resumed_from, newest, watch_first_update

CPU = torch.device("cpu")
VECTOR = EnvSpec("test", (4,), np.dtype(np.float32), "discrete", 3, ())
FRAMES = EnvSpec("frames", (4, 84, 84), np.dtype(np.uint8), "discrete", 6, ())
SMALL = dict(hidden=[32, 32], num_atoms=11, v_min=-5.0, v_max=5.0)
TIMING = ("wall_s", "charts/sps", "charts/ups")


def batch(n: int = 5, seed: int = 0) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        obs=torch.randn(n, 4, generator=g), actions=torch.randint(0, 3, (n,), generator=g),
        rewards=torch.randn(n, generator=g),
        discounts=torch.tensor([0.99 ** 3, 0.0, 0.99, 0.99 ** 2, 0.0])[:n],
        next_obs=torch.randn(n, 4, generator=g), weights=torch.ones(n))


def run(trainer: Trainer, timeout: float = 120) -> dict:
    return asyncio.run(asyncio.wait_for(trainer.run(), timeout))


# --- the C51 projection -------------------------------------------------------------------------


def test_projection_matches_hand_computed_cases():
    support = torch.tensor([-2.0, 0.0, 2.0])  # spacing 2
    probs = torch.tensor([[0.2, 0.3, 0.5]] * 4)
    rewards = torch.tensor([1.0, 5.0, -3.0, 0.5])
    discounts = torch.tensor([0.5, 0.0, 1.0, 1.0])
    projected = project_distribution(probs, rewards, discounts, support)
    expected = torch.tensor([
        # 1 + 0.5 z = [0, 1, 2]: 0 lands on atom 0 exactly, 1 splits half and half, 2 on atom 2.
        [0.0, 0.2 + 0.15, 0.15 + 0.5],
        # terminated (discount 0): every atom moves to the reward 5, clipped to v_max = 2.
        [0.0, 0.0, 1.0],
        # -3 + z = [-5, -3, -1]: the first two clip to v_min; -1 splits half and half.
        [0.2 + 0.3 + 0.25, 0.25, 0.0],
        # 0.5 + z = [-1.5, 0.5, 2.5]: -1.5 puts 3/4 on -2, 1/4 on 0; 0.5 puts 3/4 on 0, 1/4 on 2;
        # 2.5 clips to 2.
        [0.2 * 0.75, 0.2 * 0.25 + 0.3 * 0.75, 0.3 * 0.25 + 0.5],
    ])
    torch.testing.assert_close(projected, expected)


def test_projection_keeps_mass_and_the_mean_inside_the_support():
    g = torch.Generator().manual_seed(1)
    support = torch.linspace(0.0, 100.0, 51)
    probs = torch.rand(64, 51, generator=g).softmax(dim=1)
    rewards = torch.rand(64, generator=g) * 3
    discounts = torch.where(torch.rand(64, generator=g) < 0.2, 0.0, 0.99 ** 3)
    projected = project_distribution(probs, rewards, discounts, support)
    assert torch.all(projected >= 0)
    torch.testing.assert_close(projected.sum(dim=1), torch.ones(64))
    # Linear interpolation keeps the mean wherever nothing is clipped (here: below v_max).
    shifted_mean = rewards + discounts * (probs * support).sum(dim=1)
    inside = (rewards.unsqueeze(1) + discounts.unsqueeze(1) * support).max(dim=1).values <= 100
    torch.testing.assert_close((projected * support).sum(dim=1)[inside], shifted_mean[inside])


# --- the loss -----------------------------------------------------------------------------------


def _without_noise(algo: Rainbow) -> None:
    with torch.no_grad():
        for net in (algo.q, algo.target_q):
            for name, p in net.named_parameters():
                if "sigma" in name:
                    p.zero_()


@pytest.mark.parametrize("double", [True, False])
def test_loss_is_the_cross_entropy_to_the_projected_target(double):
    algo = Rainbow(VECTOR, RainbowConfig(double=double, **SMALL), CPU)
    with torch.no_grad():  # make the target net differ from the online one
        for p in algo.target_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _without_noise(algo)  # noisy forward passes then equal the mean ones: a deterministic target
    b = batch()
    loss, metrics, kl = algo.loss(b)
    rows = torch.arange(5)
    with torch.no_grad():
        log_p = algo.q(b.obs)[rows, b.actions]
        next_target = algo.target_q(b.next_obs).exp()
        chooser = algo.q(b.next_obs) if double else algo.target_q(b.next_obs)
        next_p = next_target[rows, algo.q.q_values(chooser).argmax(1)]
        target = project_distribution(next_p, b.rewards, b.discounts, algo.q.support)
        cross_entropy = -(target * log_p).sum(1)
        entropy = -torch.special.xlogy(target, target).sum(1)
    torch.testing.assert_close(loss, cross_entropy.mean())
    torch.testing.assert_close(kl, cross_entropy - entropy)  # the priorities: KL, >= 0
    assert torch.all(kl >= 0) and metrics["loss"] == loss.detach()
    # A terminated transition's target is the reward alone, on the two atoms around it.
    for i in torch.nonzero(b.discounts == 0).flatten():
        torch.testing.assert_close((target[i] * algo.q.support).sum(), b.rewards[i].clamp(-5, 5))
        assert int((target[i] > 0).sum()) <= 2


def test_importance_weights_scale_the_loss_not_the_priorities():
    algo = Rainbow(VECTOR, RainbowConfig(**SMALL), CPU)
    _without_noise(algo)
    b = batch()
    loss, _, kl = algo.loss(b)
    b.weights = torch.tensor([2.0, 0.0, 1.0, 0.5, 1.0])
    weighted, _, kl_weighted = algo.loss(b)
    torch.testing.assert_close(kl_weighted, kl)
    # The weighted mean of the per-transition cross-entropies (the unweighted loss is their mean).
    rows = torch.arange(5)
    with torch.no_grad():
        log_p = algo.q(b.obs)[rows, b.actions]
        chooser = algo.q(b.next_obs) if algo.config.double else algo.target_q(b.next_obs)
        next_p = algo.target_q(b.next_obs).exp()[rows, algo.q.q_values(chooser).argmax(1)]
        cross_entropy = -(project_distribution(next_p, b.rewards, b.discounts, algo.q.support) * log_p).sum(1)
    torch.testing.assert_close(loss, cross_entropy.mean())
    torch.testing.assert_close(weighted, (b.weights * cross_entropy).mean())


def test_updates_fit_a_fixed_batch_and_copy_the_target():
    torch.manual_seed(0)
    algo = Rainbow(VECTOR, RainbowConfig(target_update_period=50, lr=1e-3, **SMALL), CPU)
    b = batch()
    first = float(algo.loss(b)[0].detach())
    for _ in range(49):
        algo.update(b)
    assert not all(torch.equal(t, o) for t, o in zip(algo.target_q.parameters(), algo.q.parameters()))
    metrics, priorities = algo.update(b)
    assert all(torch.equal(t, o) for t, o in zip(algo.target_q.parameters(), algo.q.parameters()))
    assert float(metrics["loss"]) < first
    assert priorities.shape == (5,) and torch.all(priorities >= 0)
    assert {"loss", "kl", "q_values", "grad_norm"} <= set(metrics)


# --- noisy layers and acting --------------------------------------------------------------------


def test_noisy_linear_samples_factorised_weights_around_its_means():
    layer = NoisyLinear(6, 4, sigma0=0.5)
    x = torch.randn(10, 6)
    mean = torch.nn.functional.linear(x, layer.weight_mu, layer.bias_mu)
    torch.testing.assert_close(layer(x, noisy=False), mean)
    noisy = layer(x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(10, generator=torch.Generator().manual_seed(3))
    f = noise.sign() * noise.abs().sqrt()
    f_in, f_out = f[:6], f[6:]
    weight = layer.weight_mu + layer.weight_sigma * torch.outer(f_out, f_in)
    bias = layer.bias_mu + layer.bias_sigma * f_out
    torch.testing.assert_close(noisy, x @ weight.T + bias)
    assert not torch.allclose(noisy, mean)
    torch.testing.assert_close(layer.weight_sigma, torch.full((4, 6), 0.5 / 6 ** 0.5))
    noisy.sum().backward()  # the noise scales learn
    assert layer.weight_sigma.grad.abs().sum() > 0 and layer.bias_sigma.grad.abs().sum() > 0


def test_acting_explores_by_noise_and_evaluation_is_greedy_on_the_mean():
    algo = Rainbow(VECTOR, RainbowConfig(**SMALL), CPU)
    net = algo.make_acting_network()
    net.load_state_dict(algo.q.state_dict())
    obs = torch.randn(256, 4)
    greedy = algo.act(net, obs, 0, np.random.default_rng(0), greedy=True)
    assert np.array_equal(greedy, algo.q.q_values(algo.q(obs)).argmax(1).numpy())
    assert np.array_equal(greedy, algo.act(net, obs, 0, np.random.default_rng(5), greedy=True))
    explored = [algo.act(net, obs, 0, np.random.default_rng(seed)) for seed in range(10)]
    assert any(not np.array_equal(a, greedy) for a in explored)  # the noise changes choices
    assert np.array_equal(explored[0], algo.act(net, obs, 0, np.random.default_rng(0)))  # repeatable


def test_nature_cnn_on_uint8_frames_and_weight_store_size():
    algo = Rainbow(FRAMES, RainbowConfig(), CPU)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert algo.q(frames).shape == (2, 6, 51)
    store = WeightStore.for_module(algo.acting_network)
    store.publish(algo.acting_network)
    fresh = algo.make_acting_network()
    assert store.pull(fresh, 0) is not None
    torch.testing.assert_close(fresh(frames), algo.q(frames))
    assert np.array_equal(algo.act(fresh, frames, 0, np.random.default_rng(0), greedy=True),
                          algo.q.q_values(algo.q(frames)).argmax(1).numpy())


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    algo = Rainbow(VECTOR, RainbowConfig(**SMALL), CPU)
    for i in range(3):
        algo.update(batch(seed=i))
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and plain numbers only
    twin = Rainbow(VECTOR, RainbowConfig(**SMALL), CPU)
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.updates == 3
    torch.manual_seed(7)
    _, p0 = algo.update(batch(seed=9))
    torch.manual_seed(7)
    _, p1 = twin.update(batch(seed=9))
    torch.testing.assert_close(p1, p0)
    for a, b in zip(algo.q.parameters(), twin.q.parameters()):
        assert torch.equal(a, b)


# --- configs ------------------------------------------------------------------------------------


def test_continuous_actions_are_refused():
    spec = EnvSpec("c", (3,), np.dtype(np.float32), "continuous", 0, (1,), np.array([-2.0]), np.array([2.0]))
    with pytest.raises(ValueError, match="discrete"):
        Rainbow(spec, RainbowConfig(), CPU)


def test_preset_equals_shipped_cartpole_file_and_is_what_run_rainbow_starts():
    preset = build_config(Rainbow.preset)
    assert preset == build_config(file="configs/rainbow_cartpole.toml")
    assert registry.resolve_config("rainbow") == preset  # `python -m asyncrl run rainbow`
    assert preset.env.id == "CartPole-v1" and preset.replay.prioritized
    assert registry.get("rainbow") is Rainbow


@pytest.mark.parametrize("override, field", [
    ("algo.v_max=-20", "algo.v_max"), ("algo.num_atoms=1", "algo.num_atoms"),
    ("algo.noisy_std=0", "algo.noisy_std"), ("algo.epsilon=0.1", "algo.epsilon")])
def test_bad_values_are_one_line(override, field):
    with pytest.raises(ConfigError, match=rf"^invalid config: {field}: ") as err:
        registry.resolve_config("rainbow", overrides=[override])
    assert "\n" not in str(err.value)


# --- the trainer end to end ---------------------------------------------------------------------

SHORT = ["algo.hidden=[32, 32]", "train.total_env_steps=1500", "replay.min_size_to_sample=300",
         "train.eval_every=100000", "train.eval_episodes=2", "train.log_every=500",
         "train.checkpoint_every=100000", "train.tensorboard=false", "learner.batch_size=32"]


def test_serial_runs_repeat_exactly(tmp_path):
    rows = []
    for i in range(2):
        cfg = build_config(Rainbow.preset, overrides=[*SHORT, "train.mode='serial'"])
        result = run(Trainer(cfg, run_dir=tmp_path / str(i)))
        assert result["updates"] > 0
        rows.append([{k: v for k, v in row.items() if k not in TIMING and not k.startswith("perf/")}
                     for row in read_jsonl(tmp_path / str(i) / "metrics.jsonl")])
    assert rows[0] == rows[1] and any("losses/loss" in row for row in rows[0])


def test_process_actors_train_then_resume(tmp_path, monkeypatch):
    """The CPU default: actors in a worker process that rebuilds Rainbow by name; then a resume
    that starts from the checkpoint: its counters, networks, optimiser and replay."""
    short = [*SHORT, "actors.placement='process'"]
    first = run(Trainer(build_config(Rainbow.preset, overrides=short), run_dir=tmp_path))
    assert first["env_steps"] >= 1500 and first["updates"] > 0
    manifest, state, replay = newest(tmp_path)
    assert state["algo"]["updates"] == first["updates"] == manifest["updates"]
    trainer = Trainer(build_config(Rainbow.preset, overrides=[*short, "train.total_env_steps=2500"]),
                      run_dir=tmp_path, resume=True)
    seen = watch_first_update(monkeypatch, Rainbow, trainer)
    resumed = run(trainer)
    assert resumed["env_steps"] >= 2500 and resumed["updates"] > first["updates"]
    assert_resumed_from(seen, manifest, state, trainer, replay)


def test_pong_config_starts_and_trains(tmp_path):
    cfg = build_config(file="configs/rainbow_pong.toml", overrides=[
        "env.num_envs=4", "env.batch_size=2", "replay.capacity=2000", "replay.min_size_to_sample=200",
        "replay.samples_per_insert=4", "train.total_env_steps=600", "train.eval_every=100000",
        "train.eval_episodes=1", "env.eval_kwargs.max_episode_steps=100", "train.log_every=200",
        "train.tensorboard=false"])
    assert cfg.algo.name == "rainbow" and cfg.algo.params["v_max"] == 10.0
    result = run(Trainer(cfg, run_dir=tmp_path), timeout=240)
    assert result["env_steps"] >= 600 and result["updates"] > 0
    assert result["eval"]["eval/episodes"] == 1


@pytest.mark.learning
def test_rainbow_solves_cartpole_within_100k_steps(tmp_path):
    """Issue 7's bar: greedy return >= 475 over 20 episodes within 100k env steps (fixed seed)."""
    cfg = build_config(Rainbow.preset, overrides=["train.mode='serial'", "train.seed=0",
                                                  "train.tensorboard=false"])
    result = run(Trainer(cfg, run_dir=tmp_path), timeout=300)
    assert result["eval"]["eval/return_mean"] >= 475
    assert result["eval"]["eval/episodes"] == 20
    assert result["reached_target_at"] <= 100_000
