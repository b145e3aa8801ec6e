"""Sequence replay and its adder: overlapping windows by period, episode ends mid-sequence
(zero padding and masks), ring overwrites, priorities, the actor state stored with each step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asyncrl.acting import Acted, EnvStates
from asyncrl.sequence import SequenceAdder, SequenceReplay

STATE = {"h": ((3,), np.dtype(np.float32))}


def replay(capacity=64, streams=1, length=4, period=2, alpha=0.0, seed=0) -> SequenceReplay:
    return SequenceReplay(capacity, streams, (1,), np.dtype(np.float32), (), np.dtype(np.int64),
                          length, period, STATE, priority_exponent=alpha, seed=seed)


def put(r: SequenceReplay, value: float, applied=True, terminated=False, truncated=False, stream=0):
    """One step whose obs, action, reward and state all encode ``value``."""
    r.insert([stream], [[value]], [int(value)], [value], [terminated], [truncated], [applied],
             state={"h": np.full((1, 3), value, np.float32)})


def draw_all(r: SequenceReplay, n=400) -> dict[int, dict]:
    """Every sampleable sequence by its first obs, from many draws."""
    data = r.sample(n)
    seen = {}
    for i in range(n):
        seen[int(data["keys"][i])] = {k: (v[i] if not isinstance(v, dict) else {s: a[i] for s, a in v.items()})
                                      for k, v in data.items() if k != "keys"}
    return seen


def test_sequences_overlap_by_period_and_wait_until_complete():
    r = replay(length=4, period=2)
    for v in range(5):
        put(r, float(v))
    # starts at steps 0 and 2; only 0..3 is complete (step 4 written, 2..5 still open)
    assert r.num_sampleable == 1
    for v in range(5, 10):
        put(r, float(v))
    assert r.num_sampleable == 4  # starts 0, 2, 4, 6; 8 waits for 8..11
    seen = draw_all(r)
    assert sorted(seen) == [0, 2, 4, 6]  # keys: position * streams + stream
    for start, item in seen.items():
        np.testing.assert_array_equal(item["obs"][:, 0], np.arange(start, start + 4))
        assert item["valid"].all() and item["applied"].all()
        np.testing.assert_array_equal(item["state"]["h"], np.full(3, start))  # the state at row 0


def test_episode_end_mid_sequence_pads_with_zeros_and_masks():
    r = replay(length=4, period=2)
    for v in range(4):
        put(r, float(v + 1))  # episode steps 0..3, obs 1..4
    put(r, 5.0, terminated=True)  # step 4: its action ends the episode
    put(r, 6.0, applied=False)  # step 5: the final observation (EnvPool's reset step)
    put(r, 100.0)  # a new episode begins
    put(r, 101.0)
    seen = draw_all(r)
    assert sorted(seen) == [0, 2, 4]  # start 4 is complete, padded; the new episode's start 6 waits
    late = seen[4]
    np.testing.assert_array_equal(late["obs"][:, 0], [5, 6, 0, 0])  # the next episode never leaks in
    np.testing.assert_array_equal(late["valid"], [True, True, False, False])
    np.testing.assert_array_equal(late["applied"], [True, False, False, False])
    np.testing.assert_array_equal(late["terminated"], [True, False, False, False])
    np.testing.assert_array_equal(late["rewards"], [5, 0, 0, 0])
    full = seen[2]  # 2..5 ends exactly at the final observation
    np.testing.assert_array_equal(full["obs"][:, 0], [3, 4, 5, 6])
    np.testing.assert_array_equal(full["applied"], [True, True, True, False])
    assert full["valid"].all()
    # The new episode's sequences start at its first step, period by period.
    for v in range(102, 106):
        put(r, float(v))
    seen = draw_all(r)
    assert 6 in seen and 8 in seen
    np.testing.assert_array_equal(seen[6]["obs"][:, 0], [100, 101, 102, 103])
    np.testing.assert_array_equal(seen[6]["state"]["h"], np.full(3, 100.0))


def test_an_episode_shorter_than_a_period_still_gives_one_sequence():
    r = replay(length=6, period=3)
    put(r, 1.0, truncated=True)
    put(r, 2.0, applied=False)
    seen = draw_all(r)
    assert list(seen) == [0]
    np.testing.assert_array_equal(seen[0]["obs"][:, 0], [1, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(seen[0]["truncated"][:2], [True, False])


def test_cut_ends_sequences_at_the_last_step():
    r = replay(length=4, period=1)
    for v in range(3):
        put(r, float(v))
    assert r.num_sampleable == 0
    r.cut([0])  # the env was reset: step 2's successor never comes
    seen = draw_all(r)
    assert sorted(seen) == [0, 1]  # a start at the cut step itself holds no decision
    np.testing.assert_array_equal(seen[1]["valid"], [True, True, False, False])
    np.testing.assert_array_equal(seen[1]["applied"], [True, False, False, False])
    put(r, 10.0)  # a new episode from here
    assert r.episode_steps[0, 3] == 0


def test_ring_overwrites_never_mix_old_and_new_steps():
    r = replay(capacity=2 * 40, streams=2, length=5, period=2, seed=3)
    rng = np.random.default_rng(0)
    position = np.zeros(2, np.int64)
    ended = np.zeros(2, bool)
    for _ in range(300):
        terminated = rng.random(2) < 0.05
        r.insert([0, 1], position[:, None].astype(np.float32), position, position.astype(np.float32),
                 terminated & ~ended, np.zeros(2, bool), ~ended, state={"h": np.zeros((2, 3), np.float32)})
        ended = terminated & ~ended
        position += 1
        if r.num_sampleable:
            data = r.sample(16)
            starts, streams = np.divmod(data["keys"], 2)
            obs = data["obs"][..., 0]
            expected = (starts[:, None] + np.arange(5)) * data["valid"]
            np.testing.assert_array_equal(obs, expected)  # every valid row is the step it claims
            assert (starts > position[streams] - r.stream_capacity).all()


def test_priorities_steer_sampling_and_importance_weights():
    r = replay(length=4, period=2, alpha=1.0)
    for v in range(10):
        put(r, float(v))
    data = r.sample(4)
    r.update_priorities(data["keys"], np.where(data["keys"] == 4, 10.0, 1.0) - r.priority_eps)
    data = r.sample(400, importance_exponent=1.0)
    hot = data["keys"] == 4
    assert 0.7 < np.mean(hot) < 0.85  # 10 / 13
    assert data["weights"][~hot] == pytest.approx(1.0)  # the max within the batch
    assert data["weights"][hot] == pytest.approx(0.1)  # (P(i) / P(j)) ** -1


def test_state_dict_round_trip():
    r = replay(length=4, period=2, alpha=0.6)
    for v in range(40):
        put(r, float(v), terminated=(v == 6))
    r.update_priorities([0, 2, 10], [3.0, 0.5, 2.0])
    r.sample(8)  # its RNG moves on: the restored one must continue from there
    other = replay(length=4, period=2, alpha=0.6, seed=1)
    # As a checkpoint keeps it: arrays copied, the rest through JSON.
    other.load_state_dict({k: np.array(v) if isinstance(v, np.ndarray) else json.loads(json.dumps(v))
                           for k, v in r.state_dict().items()})
    np.testing.assert_array_equal(other._tree.tree, r._tree.tree)
    for name in SequenceReplay._ARRAYS:
        np.testing.assert_array_equal(getattr(other, name), getattr(r, name))
    np.testing.assert_array_equal(other.states["h"], r.states["h"])
    assert (other.max_priority, other.num_sampleable) == (r.max_priority, r.num_sampleable)
    # Few draws over many sequences: which ones depends on the RNG.
    a, b = r.sample(4, importance_exponent=0.5), other.sample(4, importance_exponent=0.5)
    for key in ("obs", "actions", "rewards", "terminated", "truncated", "valid", "applied", "keys", "weights"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["state"]["h"], b["state"]["h"])
    with pytest.raises(ValueError, match="capacity"):
        replay(capacity=128).load_state_dict(r.state_dict())


def test_capacity_too_small_for_the_sequence_length_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        replay(capacity=15, length=8)


def test_adder_stores_the_state_each_action_was_chosen_with():
    r = replay(streams=2, length=3, period=1)
    adder = SequenceAdder(r, 0, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), STATE)
    states = EnvStates(STATE, 2)
    after_end = np.ones(2, bool)
    # env 1 ends its episode at its second step; EnvPool then hands back its final obs
    script = [([0.0, 10.0], [False, False]), ([1.0, 11.0], [False, True]),
              ([2.0, 12.0], [False, False]), ([3.0, 13.0], [False, False]), ([4.0, 14.0], [False, False])]
    for obs, done in script:
        ids = np.arange(2)
        adder.observe(ids, np.array(obs)[:, None], np.ones(2), np.array(done), np.zeros(2, bool))
        states.reset(ids[after_end])
        before = states.get(ids)
        adder.record_actions(ids, Acted(np.zeros(2, np.int64), {}, before, 0))
        states.set(ids, {"h": before["h"] + 1})  # the "network" counts the steps of an episode
        after_end = np.array(done)
    # stream 1: its episode 10, 11(final obs) then a new one 12, 13: states restart from 0 there
    np.testing.assert_array_equal(r.states["h"][1, :4, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(r.states["h"][0, :4, 0], [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="actor state"):
        adder.record_actions([0], Acted(np.zeros(1, np.int64), {}, {}, 0))


def lockstep(r: SequenceReplay, steps: int) -> None:
    streams = np.arange(r.num_streams)
    for _ in range(steps):
        positions = r.head[streams].astype(np.float32)
        r.insert(streams, positions[:, None], positions.astype(np.int64), positions,
                 np.zeros(len(streams), bool), np.zeros(len(streams), bool), np.ones(len(streams), bool),
                 state={"h": np.zeros((len(streams), 3), np.float32)})


def test_each_batch_of_a_multi_batch_draw_spans_the_streams():
    # One stratified pass over 4 batches of 32, cut into consecutive batches, gave streams
    # {0-3}, {4-7}, {8-11}, {12-15}.
    r = replay(capacity=16 * 32, streams=16, length=4, period=2)
    lockstep(r, 20)
    single = np.divmod(r.sample(32)["keys"], 16)[1]
    assert set(single.tolist()) == set(range(16))
    streams = np.divmod(r.sample(32, batches=4)["keys"], 16)[1]
    for rows in streams.reshape(4, 32):
        assert set(rows.tolist()) == set(range(16))
        assert np.bincount(rows, minlength=16).tolist() == np.bincount(single, minlength=16).tolist()


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_a_multi_batch_draw_is_as_many_single_draws(alpha):
    def build() -> SequenceReplay:
        r = replay(capacity=8 * 32, streams=8, length=4, period=2, alpha=alpha)
        lockstep(r, 20)
        keys = np.arange(0, 16, 2)[:, None] * 8 + np.arange(8)  # starts 0, 2, ..., 14
        r.update_priorities(keys.ravel(), np.random.default_rng(2).uniform(0.1, 5.0, keys.size))
        return r

    one, separate = build(), build()
    drawn = one.sample(16, importance_exponent=0.5, batches=4)
    calls = [separate.sample(16, importance_exponent=0.5) for _ in range(4)]
    for name in ("obs", "actions", "rewards", "valid", "applied", "weights", "keys"):
        np.testing.assert_array_equal(drawn[name], np.concatenate([c[name] for c in calls]))
    np.testing.assert_array_equal(drawn["state"]["h"], np.concatenate([c["state"]["h"] for c in calls]))
