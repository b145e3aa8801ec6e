"""TD3's maths on hand-made batches (target smoothing, the delayed policy and targets, the critic
target), its actions, checkpointing, its configs, and a learning check on Pendulum-v1."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from algos.td3 import TD3, TD3Config
from asyncrl.config import build_config
from asyncrl.core import EnvSpec, TransitionBatch

CPU = torch.device("cpu")
SPEC = EnvSpec("box", (3,), np.dtype(np.float32), "continuous", 0, (2,),
               np.array([-2.0, 0.0], np.float32), np.array([2.0, 0.5], np.float32))
HALF_RANGE = np.array([2.0, 0.25], np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def small(**kwargs) -> TD3:
    return TD3(SPEC, TD3Config(hidden=[32, 32], **kwargs), CPU)


def batch(n: int = 64, seed: int = 0) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.from_numpy(SPEC.action_low), torch.from_numpy(SPEC.action_high)
    discounts = torch.full((n,), 0.99)
    discounts[::4] = 0.0
    return TransitionBatch(
        obs=torch.randn(n, 3, generator=g), actions=low + (high - low) * torch.rand(n, 2, generator=g),
        rewards=torch.randn(n, generator=g), discounts=discounts,
        next_obs=torch.randn(n, 3, generator=g), weights=torch.ones(n))


def test_target_smoothing_noise_is_clipped_and_stays_within_bounds():
    algo = small(target_noise=10.0, target_noise_clip=0.3)
    next_obs = torch.randn(5000, 3)
    with torch.no_grad():
        clean = algo.target_actor(next_obs)
        smoothed = algo.smoothed_target_action(next_obs)
    deviation = (smoothed - clean).abs()
    limit = 0.3 * torch.from_numpy(HALF_RANGE)
    assert torch.all(deviation <= limit + 1e-6)
    # With a std 33x the clip, ~98% of draws are clipped: the clip is reached, not just respected
    # (where the box's edge is farther away than the clip).
    inside = (clean - limit > torch.from_numpy(SPEC.action_low)) & (clean + limit < torch.from_numpy(SPEC.action_high))
    at_clip = (deviation - limit).abs() < 1e-5
    assert at_clip[inside].float().mean() > 0.95
    assert torch.all(smoothed >= torch.from_numpy(SPEC.action_low))
    assert torch.all(smoothed <= torch.from_numpy(SPEC.action_high))
    quiet = small(target_noise=0.0)
    with torch.no_grad():
        torch.testing.assert_close(quiet.smoothed_target_action(next_obs), quiet.target_actor(next_obs))


def test_critic_target_bootstraps_only_through_nonterminal_steps():
    algo = small()
    b = batch()
    torch.manual_seed(5)
    target = algo.critic_target(b)
    torch.manual_seed(5)
    with torch.no_grad():
        q1, q2 = algo.target_critic(b.next_obs, algo.smoothed_target_action(b.next_obs))
    torch.testing.assert_close(target, b.rewards + b.discounts * torch.min(q1, q2))
    terminal = b.discounts == 0
    torch.testing.assert_close(target[terminal], b.rewards[terminal])


def test_policy_and_targets_move_only_every_policy_delay_updates():
    algo = small(policy_delay=3, tau=0.1)
    snapshot = lambda module: [p.clone() for p in module.parameters()]  # noqa: E731
    for update in range(1, 7):
        actor, critic = snapshot(algo.actor), snapshot(algo.critic)
        targets = snapshot(algo.target_actor) + snapshot(algo.target_critic)
        algo.update(batch(seed=update))
        assert not any(torch.equal(a, b) for a, b in zip(critic, algo.critic.parameters()))  # every update
        policy_step = update % 3 == 0
        assert any(not torch.equal(a, b) for a, b in zip(actor, algo.actor.parameters())) == policy_step
        now = list(algo.target_actor.parameters()) + list(algo.target_critic.parameters())
        onlines = list(algo.actor.parameters()) + list(algo.critic.parameters())
        for old, new, online in zip(targets, now, onlines):
            if policy_step:
                torch.testing.assert_close(new, old + 0.1 * (online - old))
            else:
                assert torch.equal(old, new)


def test_policy_loss_trains_the_policy_not_the_critic():
    algo = small()
    algo.policy_loss(batch().obs).backward()
    assert all(p.grad is None for p in algo.critic.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.actor.parameters())


def test_actions_within_bounds_with_the_configured_exploration_noise():
    algo = small(random_steps=100, exploration_noise=0.1)
    net = algo.make_acting_network()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()  # the policy's action is the box's centre, [0, 0.25]
    obs = torch.randn(20_000, 3)
    rng = np.random.default_rng(0)
    greedy = algo.act(net, obs, 10**6, rng, greedy=True)
    np.testing.assert_allclose(greedy, np.broadcast_to([0.0, 0.25], greedy.shape))
    noisy = algo.act(net, obs, 10**6, rng)
    assert noisy.dtype == np.float32 and noisy.shape == (20_000, 2)
    np.testing.assert_allclose(noisy.std(0), 0.1 * HALF_RANGE, rtol=0.05)
    warmup = algo.act(net, obs, 0, rng)
    np.testing.assert_allclose(warmup.std(0), 2 * HALF_RANGE / np.sqrt(12), rtol=0.05)  # uniform
    with torch.no_grad():
        net.head.weight.normal_(0, 100.0)  # saturated: noise would leave the box if unclipped
    for env_steps, greedy_ in ((0, False), (10**6, False), (10**6, True)):
        actions = algo.act(net, obs * 10, env_steps, rng, greedy=greedy_)
        assert actions.dtype == np.float32
        assert np.all(actions >= SPEC.action_low) and np.all(actions <= SPEC.action_high)


def test_state_dict_round_trip_resumes_identically():
    algo = small()
    for i in range(3):
        algo.update(batch(seed=i))
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    twin = small()
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert twin.updates == 3
    for _ in range(2):  # the next update is a policy step (policy_delay 2): the delay resumes too
        torch.manual_seed(7)
        algo.update(batch(seed=9))
        torch.manual_seed(7)
        twin.update(batch(seed=9))
    for name in ("actor", "target_actor", "critic", "target_critic"):
        for a, b in zip(getattr(algo, name).parameters(), getattr(twin, name).parameters()):
            assert torch.equal(a, b), name


def test_discrete_actions_are_refused():
    discrete = EnvSpec("d", (4,), np.dtype(np.float32), "discrete", 2, ())
    with pytest.raises(ValueError, match="continuous"):
        TD3(discrete, TD3Config(), CPU)


def test_preset_equals_shipped_pendulum_file():
    preset = build_config(TD3.preset)
    assert preset == build_config(file="configs/td3_pendulum.toml")
    assert preset.env.id == "Pendulum-v1" and preset.algo.name == "td3"
