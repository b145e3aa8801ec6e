"""SAC's maths on hand-made batches (the squashed log-density, the critic target, the temperature),
its actions, checkpointing, its configs, and a learning check on Pendulum-v1."""

from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
import torch

from algos.sac import SAC, SACConfig
from asyncrl.config import ConfigError, build_config
from asyncrl.core import EnvSpec, TransitionBatch
from asyncrl.trainer import Trainer
from resume_checks import assert_resumed_from, newest, watch_first_update

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# Asymmetric, uneven bounds: the scaling to them is tested, not just [-1, 1].
SPEC = EnvSpec("box", (3,), np.dtype(np.float32), "continuous", 0, (2,),
               np.array([-2.0, 0.0], np.float32), np.array([2.0, 0.5], np.float32))
LINE = EnvSpec("line", (3,), np.dtype(np.float32), "continuous", 0, (1,),
               np.array([-2.0], np.float32), np.array([1.0], np.float32))


def batch(n: int = 64, seed: int = 0, spec: EnvSpec = SPEC) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.from_numpy(spec.action_low), torch.from_numpy(spec.action_high)
    discounts = torch.full((n,), 0.99)
    discounts[::4] = 0.0  # some terminated transitions
    return TransitionBatch(
        obs=torch.randn(n, 3, generator=g), actions=low + (high - low) * torch.rand(n, 2, generator=g),
        rewards=torch.randn(n, generator=g), discounts=discounts,
        next_obs=torch.randn(n, 3, generator=g), weights=torch.ones(n))


def test_log_prob_matches_torch_distributions():
    """The change of variables against torch's own tanh-then-affine transformed Gaussian."""
    algo = SAC(SPEC, SACConfig(), CPU)
    obs = torch.randn(256, 3)
    noise = torch.randn(256, 2)
    action, log_prob = algo.actor.sample(obs, noise)
    mean, log_std = algo.actor(obs)
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(algo.actor.centre, algo.actor.scale)])
    # Evaluate the reference at the same pre-squash sample (inverting tanh near +-1 is lossy).
    pre_squash = mean + log_std.exp() * noise
    expected = reference.base_dist.log_prob(pre_squash).sum(-1)
    for t in reference.transforms:
        expected = expected - t.log_abs_det_jacobian(pre_squash, t(pre_squash)).sum(-1)
        pre_squash = t(pre_squash)
    torch.testing.assert_close(action, pre_squash)
    torch.testing.assert_close(log_prob, expected, rtol=1e-4, atol=1e-4)


def test_log_density_integrates_to_one_and_matches_a_histogram():
    """Monte Carlo: the density the policy reports is the density of the actions it samples."""
    torch.manual_seed(0)
    algo = SAC(LINE, SACConfig(), CPU)
    with torch.no_grad():
        algo.actor.head.bias.copy_(torch.tensor([0.7, 0.3]))  # mean 0.7 before tanh, wide std
        obs = torch.zeros(1, 3)
        mean, log_std = (t.item() for t in algo.actor(obs))
        # The density at grid actions: invert the squash to find the noise that gives each action.
        grid = torch.linspace(-2, 1, 3001)[1:-1]
        u = torch.atanh((grid - algo.actor.centre) / algo.actor.scale)
        _, log_prob = algo.actor.sample(obs.expand(len(grid), 3), ((u - mean) / math.exp(log_std)).unsqueeze(1))
        density = log_prob.exp()
        assert float(density.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=0.01)
        samples, _ = algo.actor.sample(obs.expand(400_000, 3))
    counts, edges = np.histogram(samples.numpy().ravel(), bins=30, range=(-2, 1), density=True)
    centres = torch.from_numpy((edges[:-1] + edges[1:]) / 2).float()
    inner = slice(2, -2)  # the edge bins hold a steep density: compare where a bin is near flat
    at_centres = np.interp(centres.numpy(), grid.numpy(), density.numpy())
    np.testing.assert_allclose(counts[inner], at_centres[inner], rtol=0.05, atol=0.01)


def test_actions_are_float32_within_bounds_in_every_mode():
    algo = SAC(SPEC, SACConfig(random_steps=100), CPU)
    net = algo.make_acting_network()
    with torch.no_grad():
        net.head.weight.mul_(100.0)  # saturate tanh: rounding would leave the bounds if unclipped
    obs = torch.randn(2000, 3) * 10
    rng = np.random.default_rng(0)
    for env_steps, greedy in ((0, False), (10**6, False), (10**6, True)):
        actions = algo.act(net, obs, env_steps, rng, greedy=greedy)
        assert actions.dtype == np.float32 and actions.shape == (2000, 2)
        assert np.all(actions >= SPEC.action_low) and np.all(actions <= SPEC.action_high)
    # Warm-up actions cover the box uniformly; the greedy action is tanh(mean), scaled.
    warmup = algo.act(net, obs, 0, rng)
    np.testing.assert_allclose(warmup.mean(0), [0.0, 0.25], atol=0.1)
    np.testing.assert_allclose(algo.act(net, obs[:5], 0, rng, greedy=True), net.greedy(obs[:5]).detach().numpy())


def test_exploration_noise_comes_from_the_actors_generator():
    algo = SAC(SPEC, SACConfig(random_steps=0), CPU)
    net = algo.make_acting_network()
    obs = torch.randn(10, 3)
    a = algo.act(net, obs, 0, np.random.default_rng(1))
    b = algo.act(net, obs, 0, np.random.default_rng(1))
    c = algo.act(net, obs, 0, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_critic_target_bootstraps_only_through_nonterminal_steps():
    algo = SAC(SPEC, SACConfig(init_alpha=0.3), CPU)
    b = batch()
    torch.manual_seed(5)
    target = algo.critic_target(b)
    torch.manual_seed(5)  # the same policy noise, by hand
    with torch.no_grad():
        next_action, next_log_prob = algo.actor.sample(b.next_obs)
        q1, q2 = algo.target_critic(b.next_obs, next_action)
        expected = b.rewards + b.discounts * (torch.min(q1, q2) - 0.3 * next_log_prob)
    torch.testing.assert_close(target, expected)
    terminal = b.discounts == 0
    torch.testing.assert_close(target[terminal], b.rewards[terminal])


def test_policy_loss_trains_the_policy_not_the_critics():
    algo = SAC(SPEC, SACConfig(), CPU)
    loss, _ = algo.policy_loss(batch().obs)
    loss.backward()
    assert all(p.grad is None for p in algo.critic.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.actor.parameters())


def test_an_update_fits_the_critics_and_moves_the_targets_by_tau():
    algo = SAC(SPEC, SACConfig(hidden=[32, 32], tau=0.1, critic_lr=1e-3), CPU)
    b = batch()
    torch.manual_seed(3)
    target = algo.critic_target(b)

    def error() -> float:  # both critics against the target taken before the update
        with torch.no_grad():
            return float((algo.critic(b.obs, b.actions) - target).pow(2).mean())

    before, targets_before = error(), [p.clone() for p in algo.target_critic.parameters()]
    torch.manual_seed(3)
    metrics, priorities = algo.update(b)
    assert error() < before
    for old, new, online in zip(targets_before, algo.target_critic.parameters(), algo.critic.parameters()):
        torch.testing.assert_close(new, old + 0.1 * (online - old))
    assert float(metrics["critic_loss"]) == pytest.approx(2 * before, rel=1e-5)  # summed over twins
    assert priorities.shape == (64,) and torch.all(priorities >= 0)
    assert set(metrics) == {"critic_loss", "actor_loss", "alpha", "entropy", "q_values"}


@pytest.mark.parametrize("target_entropy, direction", [(5.0, 1), (-20.0, -1)])
def test_temperature_moves_toward_the_target_entropy(target_entropy, direction):
    """Entropy below the target raises alpha (more exploration); above it lowers alpha."""
    algo = SAC(SPEC, SACConfig(hidden=[32, 32], target_entropy=target_entropy, alpha_lr=1e-2), CPU)
    b = batch()
    for _ in range(20):
        metrics, _ = algo.update(b)
    entropy = float(metrics["entropy"])
    assert (entropy < target_entropy) if direction > 0 else (entropy > target_entropy)
    assert math.copysign(1, float(algo.alpha) - 1.0) == direction


def test_fixed_temperature_stays_put():
    algo = SAC(SPEC, SACConfig(hidden=[32, 32], autotune_alpha=False, init_alpha=0.2), CPU)
    for _ in range(5):
        algo.update(batch())
    assert float(algo.alpha) == pytest.approx(0.2)


def test_state_dict_round_trip_resumes_identically():
    algo = SAC(SPEC, SACConfig(hidden=[32, 32]), CPU)
    for i in range(3):
        algo.update(batch(seed=i))
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and plain numbers only
    twin = SAC(SPEC, SACConfig(hidden=[32, 32]), CPU)
    twin.load_state_dict(state)
    assert twin.updates == 3 and torch.equal(twin.log_alpha, algo.log_alpha)
    torch.manual_seed(7)
    algo.update(batch(seed=9))
    torch.manual_seed(7)
    twin.update(batch(seed=9))
    for a, b in zip(algo.state_dict()["critic"].values(), twin.state_dict()["critic"].values()):
        assert torch.equal(a, b)
    for a, b in zip(algo.actor.parameters(), twin.actor.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(algo.log_alpha, twin.log_alpha)


def test_discrete_and_unbounded_action_spaces_are_refused():
    discrete = EnvSpec("d", (4,), np.dtype(np.float32), "discrete", 2, ())
    with pytest.raises(ValueError, match="continuous"):
        SAC(discrete, SACConfig(), CPU)
    unbounded = EnvSpec("u", (4,), np.dtype(np.float32), "continuous", 0, (1,),
                        np.array([-np.inf], np.float32), np.array([np.inf], np.float32))
    with pytest.raises(ValueError, match="bounded"):
        SAC(unbounded, SACConfig(), CPU)


def test_preset_equals_shipped_pendulum_file_and_bad_values_are_one_line():
    preset = build_config(SAC.preset)
    assert preset == build_config(file="configs/sac_pendulum.toml")
    assert preset.env.id == "Pendulum-v1" and preset.algo.name == "sac"
    with pytest.raises(ConfigError, match=r"^invalid config: algo\.tau: .*\n?$") as err:
        from asyncrl import registry
        registry.algo_config(SAC, build_config(SAC.preset, overrides=["algo.tau=2"]).algo.params)
    assert "\n" not in str(err.value)


def test_process_actors_train_then_resume(tmp_path, monkeypatch):
    """The CPU default: actors in a worker process that rebuilds SAC by name; then a resume that
    starts from the checkpoint: its counters, networks, optimisers, temperature and replay."""
    short = ["algo.hidden=[32, 32]", "train.total_env_steps=800", "replay.min_size_to_sample=200",
             "algo.random_steps=200", "replay.samples_per_insert=32", "train.eval_every=100000", "train.eval_episodes=2",
             "train.checkpoint_every=100000", "train.tensorboard=false", "actors.placement='process'"]
    first = asyncio.run(asyncio.wait_for(
        Trainer(build_config(SAC.preset, overrides=short), run_dir=tmp_path).run(), 120))
    assert first["env_steps"] >= 800 and first["updates"] > 0
    manifest, state, replay = newest(tmp_path)
    trainer = Trainer(build_config(SAC.preset, overrides=[*short, "train.total_env_steps=1200"]),
                      run_dir=tmp_path, resume=True)
    seen = watch_first_update(monkeypatch, SAC, trainer)
    resumed = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    assert resumed["env_steps"] >= 1200 and resumed["updates"] > first["updates"]
    assert_resumed_from(seen, manifest, state, trainer, replay)
