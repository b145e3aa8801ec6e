"""On-policy data: GAE and V-trace against naive references, the trajectory adder's boundaries,
the FIFO rollout queue (each item once, producers wait when full, stop releases waiters)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from algos.impala import vtrace
from algos.ppo import gae
from asyncrl.acting import Acted
from asyncrl.ratelimit import LimiterStopped
from asyncrl.rollout import RolloutQueue, TrajectoryAdder, min_queue_capacity

EXTRAS = {"log_prob": ((), np.dtype(np.float32))}


# --- GAE ---------------------------------------------------------------------------------------


def naive_gae(rewards, values, terminated, truncated, applied, gamma, lam):
    """One env, one step at a time, following the episode by hand."""
    steps = len(rewards)
    out = np.zeros(steps)
    for t in range(steps):
        if not applied[t]:
            continue
        total, discount = 0.0, 1.0
        for k in range(t, steps):
            bootstrap = 0.0 if terminated[k] else values[k + 1]
            delta = rewards[k] + gamma * bootstrap - values[k]
            total += discount * delta
            if terminated[k] or truncated[k]:
                break
            discount *= gamma * lam
        out[t] = total
    return out


def episode_rows(rng, steps, ends):
    """A [T] stream with episode ends at the given rows (kind 'term' or 'trunc'); the row after
    each end is EnvPool's reset step (not applied)."""
    terminated, truncated = np.zeros(steps, bool), np.zeros(steps, bool)
    applied = np.ones(steps, bool)
    rewards = rng.normal(size=steps).astype(np.float32)
    for row, kind in ends:
        (terminated if kind == "term" else truncated)[row] = True
        if row + 1 < steps:
            applied[row + 1] = False
            rewards[row + 1] = 0.0
    return rewards, terminated, truncated, applied


@pytest.mark.parametrize("ends", [[], [(3, "term")], [(3, "trunc")], [(2, "term"), (6, "trunc")],
                                  [(9, "term")], [(9, "trunc")], [(0, "trunc"), (5, "term")]])
def test_gae_matches_a_naive_reference(ends):
    rng = np.random.default_rng(0)
    steps, gamma, lam = 10, 0.9, 0.8
    rewards, terminated, truncated, applied = episode_rows(rng, steps, ends)
    values = rng.normal(size=steps + 1).astype(np.float32)
    got = gae(*(torch.from_numpy(x)[:, None] for x in (rewards, values, terminated, truncated, applied)),
              gamma, lam)
    expected = naive_gae(rewards, values, terminated, truncated, applied, gamma, lam)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gae_truncation_bootstraps_from_the_final_observation_and_termination_does_not():
    rewards = torch.tensor([[1.0], [0.0]])
    values = torch.tensor([[0.0], [10.0], [0.0]])  # obs[1] is the final observation
    applied = torch.tensor([[True], [False]])
    no = torch.tensor([[False], [False]])
    end = torch.tensor([[True], [False]])
    assert gae(rewards, values, no, end, applied, 0.5, 1.0)[0, 0] == pytest.approx(1.0 + 0.5 * 10.0)
    assert gae(rewards, values, end, no, applied, 0.5, 1.0)[0, 0] == pytest.approx(1.0)


# --- V-trace -----------------------------------------------------------------------------------


def naive_vtrace(behaviour, target, rewards, values, terminated, truncated, gamma, rho_bar, c_bar):
    """Espeholt et al. eq. (1) summed term by term, per start step, stopping at episode ends."""
    steps = len(rewards)
    ratio = np.exp(target - behaviour)
    rho, c = np.minimum(rho_bar, ratio), np.minimum(c_bar, ratio)
    vs = np.zeros(steps)
    for s in range(steps):
        total, trace = 0.0, 1.0
        for t in range(s, steps):
            bootstrap = 0.0 if terminated[t] else values[t + 1]
            total += gamma ** (t - s) * trace * rho[t] * (rewards[t] + gamma * bootstrap - values[t])
            if terminated[t] or truncated[t]:
                break
            trace *= c[t]
        vs[s] = values[s] + total
    adv = np.zeros(steps)
    for s in range(steps):
        if terminated[s]:
            nxt = 0.0
        elif truncated[s] or s == steps - 1:
            nxt = values[s + 1]
        else:
            nxt = vs[s + 1]
        adv[s] = rho[s] * (rewards[s] + gamma * nxt - values[s])
    return vs, adv


@pytest.mark.parametrize("ends", [[], [(3, "term")], [(4, "trunc")], [(1, "term"), (6, "trunc")], [(9, "term")]])
@pytest.mark.parametrize("rho_bar, c_bar", [(1.0, 1.0), (0.8, 0.5), (2.0, 1.5)])
def test_vtrace_matches_a_naive_reference(ends, rho_bar, c_bar):
    rng = np.random.default_rng(1)
    steps, gamma = 10, 0.95
    rewards, terminated, truncated, _ = episode_rows(rng, steps, ends)
    values = rng.normal(size=steps + 1).astype(np.float32)
    behaviour = np.log(rng.uniform(0.1, 1.0, size=steps)).astype(np.float32)
    target = np.log(rng.uniform(0.1, 1.0, size=steps)).astype(np.float32)
    t = [torch.from_numpy(x)[:, None] for x in (behaviour, target, rewards, values, terminated, truncated)]
    vs, adv = vtrace(*t, gamma, rho_bar, c_bar)
    exp_vs, exp_adv = naive_vtrace(behaviour, target, rewards, values, terminated, truncated, gamma, rho_bar, c_bar)
    np.testing.assert_allclose(vs[:, 0].numpy(), exp_vs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adv[:, 0].numpy(), exp_adv, rtol=1e-4, atol=1e-4)


def test_vtrace_on_policy_gives_bootstrapped_discounted_returns():
    rng = np.random.default_rng(2)
    steps, envs, gamma = 7, 3, 0.9
    rewards = torch.from_numpy(rng.normal(size=(steps, envs)).astype(np.float32))
    values = torch.from_numpy(rng.normal(size=(steps + 1, envs)).astype(np.float32))
    log_probs = torch.from_numpy(np.log(rng.uniform(0.1, 1, size=(steps, envs))).astype(np.float32))
    flags = torch.zeros(steps, envs, dtype=torch.bool)
    vs, _ = vtrace(log_probs, log_probs, rewards, values, flags, flags, gamma, 1.0, 1.0)
    for s in range(steps):
        expected = sum(gamma ** (k - s) * rewards[k] for k in range(s, steps)) + gamma ** (steps - s) * values[-1]
        torch.testing.assert_close(vs[s], expected, rtol=1e-5, atol=1e-5)


# --- the adder ---------------------------------------------------------------------------------


def adder_and_queue(length=3, num_envs=2, capacity=8):
    queue = RolloutQueue(capacity, length, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
    adder = TrajectoryAdder(queue, num_envs, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
    return adder, queue


def feed(adder, queue, ids, obs, reward=0.0, term=(), trunc=(), version=1):
    ids = np.asarray(ids)
    n = len(ids)
    terminated = np.isin(ids, term)
    truncated = np.isin(ids, trunc)
    pending = adder.pending(ids)
    if pending:
        assert queue.try_insert(pending)
    done = adder.observe(ids, np.full((n, 1), obs, np.float32), np.full(n, reward, np.float32),
                         terminated, truncated)
    assert done == pending
    adder.record_actions(ids, Acted(np.full(n, obs, np.int64), {"log_prob": np.full(n, -obs, np.float32)},
                                    {}, version))


def take_all(queue):
    n = queue.size
    assert queue.try_sample(n)
    return queue.take(n)


def test_adder_cuts_trajectories_that_share_their_bootstrap_observation():
    adder, queue = adder_and_queue(length=3, num_envs=2)
    for k in range(7):  # obs 0..6: two trajectories of 3 per env (obs 0-3 and 3-6)
        feed(adder, queue, [0, 1], obs=k, reward=k, version=10 + k)
    fields, extras = take_all(queue)
    assert fields["obs"].shape == (4, 4, 1)  # [T + 1, B]
    np.testing.assert_array_equal(fields["obs"][:, :, 0].T, [[0, 1, 2, 3], [0, 1, 2, 3], [3, 4, 5, 6], [3, 4, 5, 6]])
    np.testing.assert_array_equal(fields["actions"].T, [[0, 1, 2]] * 2 + [[3, 4, 5]] * 2)
    np.testing.assert_array_equal(fields["rewards"].T, [[1, 2, 3]] * 2 + [[4, 5, 6]] * 2)
    np.testing.assert_array_equal(extras["log_prob"].T, [[0, -1, -2]] * 2 + [[-3, -4, -5]] * 2)
    np.testing.assert_array_equal(fields["weight_version"], [10, 10, 13, 13])  # the first action's
    assert fields["applied"].all()


def test_adder_marks_the_reset_step_and_keeps_terminated_and_truncated_apart():
    adder, queue = adder_and_queue(length=4, num_envs=2)
    feed(adder, queue, [0, 1], obs=0)
    feed(adder, queue, [0, 1], obs=1, reward=1)
    feed(adder, queue, [0, 1], obs=2, reward=1, term=[0], trunc=[1])  # obs 2 is each episode's last
    feed(adder, queue, [0, 1], obs=100, reward=0)  # the reset step: a new episode's first obs
    feed(adder, queue, [0, 1], obs=101, reward=1)
    fields, _ = take_all(queue)
    np.testing.assert_array_equal(fields["obs"][:, 0, 0], [0, 1, 2, 100, 101])
    np.testing.assert_array_equal(fields["terminated"][:, 0], [False, True, False, False])
    np.testing.assert_array_equal(fields["truncated"][:, 0], [False, False, False, False])
    np.testing.assert_array_equal(fields["truncated"][:, 1], [False, True, False, False])
    np.testing.assert_array_equal(fields["terminated"][:, 1], [False, False, False, False])
    # row 2 chose an action at an episode's final observation: the env ignored it
    np.testing.assert_array_equal(fields["applied"][:, 0], [True, True, False, True])


def test_adder_takes_envs_in_any_order_and_subset():
    adder, queue = adder_and_queue(length=2, num_envs=3)
    feed(adder, queue, [2, 0], obs=0)
    feed(adder, queue, [1], obs=0)
    feed(adder, queue, [0, 2], obs=1)
    feed(adder, queue, [2], obs=2)  # env 2 finishes first
    assert queue.size == 1
    feed(adder, queue, [0], obs=2)
    assert queue.size == 2
    feed(adder, queue, [1], obs=1)
    feed(adder, queue, [1], obs=2)
    assert queue.size == 3
    fields, _ = take_all(queue)
    np.testing.assert_array_equal(fields["obs"][:, :, 0].T, [[0, 1, 2]] * 3)


def test_adder_insists_on_the_calling_order():
    adder, queue = adder_and_queue()
    adder.observe([0], np.zeros((1, 1)), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool))
    with pytest.raises(RuntimeError, match="record_actions"):
        adder.observe([0], np.zeros((1, 1)), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool))
    with pytest.raises(RuntimeError, match="observe"):
        adder.record_actions([1], Acted(np.zeros(1, np.int64), {"log_prob": np.zeros(1)}, {}, 0))


# --- the queue ---------------------------------------------------------------------------------


def put_one(queue, value):
    t = queue.length
    queue.put({"obs": np.full((1, t + 1, 1), value, np.float32), "actions": np.zeros((1, t), np.int64),
               "rewards": np.zeros((1, t), np.float32), "terminated": np.zeros((1, t), bool),
               "truncated": np.zeros((1, t), bool), "applied": np.ones((1, t), bool),
               "weight_version": np.array([value])}, {"log_prob": np.zeros((1, t), np.float32)})


def test_queue_is_fifo_and_gives_each_item_once_across_wraparound():
    queue = RolloutQueue(3, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
    seen = []
    for value in range(10):
        assert queue.try_insert(1)
        put_one(queue, value)
        if queue.size == 2:
            assert queue.try_sample(2)
            fields, _ = queue.take(2)
            seen.extend(fields["weight_version"].tolist())
    assert seen == list(range(10))
    assert not queue.try_sample(1)


def test_queue_refuses_puts_without_room_and_takes_without_claims():
    queue = RolloutQueue(2, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
    with pytest.raises(RuntimeError, match="await_insert"):
        put_one(queue, 0)
    assert queue.try_insert(2) and not queue.try_insert(1)
    put_one(queue, 0)
    with pytest.raises(RuntimeError, match="await_sample"):
        queue.take(1)


def test_producers_wait_while_full_and_a_take_releases_them():
    async def main():
        queue = RolloutQueue(2, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
        await queue.await_insert(2)
        put_one(queue, 0)
        put_one(queue, 1)
        producer = asyncio.create_task(queue.await_insert(1))
        await asyncio.sleep(0.05)
        assert not producer.done()  # full: the producer waits
        await asyncio.wait_for(queue.await_sample(1), 1)
        queue.take(1)
        await asyncio.wait_for(producer, 1)
        put_one(queue, 2)
        await queue.await_sample(2)
        assert queue.take(2)[0]["weight_version"].tolist() == [1, 2]

    asyncio.run(asyncio.wait_for(main(), 5))


@pytest.mark.parametrize("batch, max_put", [(1, 1), (24, 16), (8, 32), (5, 3)])
def test_a_queue_of_min_capacity_never_wedges_and_one_less_can(batch, max_put):
    def wedged(capacity: int, stored: int) -> bool:
        """Neither a put of max_put nor a batch fits once ``stored`` trajectories are in."""
        queue = RolloutQueue(capacity, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
        assert stored == 0 or queue.try_insert(stored)
        for _ in range(stored):
            put_one(queue, 0)
        return not queue.try_sample(batch) and not queue.try_insert(max_put)

    least = min_queue_capacity(batch, max_put)
    assert least >= max(batch, max_put)
    assert not any(wedged(least, stored) for stored in range(least + 1))
    if least - 1 >= max(batch, max_put):  # a smaller queue that takes a put and a batch at all
        assert any(wedged(least - 1, stored) for stored in range(least))


def test_stop_releases_waiting_producers_and_consumers():
    async def main():
        queue = RolloutQueue(1, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), EXTRAS)
        await queue.await_insert(1)
        producer = asyncio.create_task(queue.await_insert(1))
        consumer = asyncio.create_task(queue.await_sample(1))
        await asyncio.sleep(0.05)
        assert not producer.done() and not consumer.done()
        queue.stop()
        for task in (producer, consumer):
            with pytest.raises(LimiterStopped):
                await asyncio.wait_for(task, 1)
        with pytest.raises(LimiterStopped):
            await queue.await_sample(1)

    asyncio.run(asyncio.wait_for(main(), 5))
