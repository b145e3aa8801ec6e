import envpool
import numpy as np
import pytest

from asyncrl.acting import Acted
from asyncrl.adders import NStepAdder
from asyncrl.replay import Replay

N_STEP, GAMMA = 3, 0.9


def acted(actions) -> Acted:
    """What a policy step hands an n-step adder: the actions (nothing else is stored)."""
    return Acted(np.asarray(actions), {}, {}, 0)


def expected_transition(truth, env_id, step):
    """The n-step transition from ``step``, worked out from what the env returned; None when
    the observation is an episode's last (the env ignored the action sent at it)."""
    obs, _, terminated, truncated, action = truth[env_id, step]
    if terminated or truncated:
        return None
    ret = 0.0
    for j in range(N_STEP):
        _, reward, terminated, truncated, _ = truth[env_id, step + 1 + j]
        ret += GAMMA**j * reward
        if terminated or truncated:
            break
    k = j + 1
    next_obs, _, terminated, _, _ = truth[env_id, step + k]
    return obs, action, ret, 0.0 if terminated else GAMMA**k, next_obs


def test_transitions_match_what_envpool_returned():
    num_envs, per_stream = 4, 200
    env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=num_envs, batch_size=2,
                       seed=0, max_episode_steps=15)  # short episodes: truncations as well
    replay = Replay(num_envs * per_stream, num_envs, (4,), np.float32, (), np.int64, N_STEP, GAMMA,
                    seed=0)
    adder = NStepAdder(replay, 0, num_envs, (4,), np.float32, (), np.int64)
    rng = np.random.default_rng(0)
    truth = {}  # (env_id, step): (obs, reward, terminated, truncated, action sent)
    steps = np.zeros(num_envs, np.int64)
    env.async_reset()
    for _ in range(1500):
        obs, rewards, terminated, truncated, info = env.recv()
        ids = info["env_id"]
        pending = adder.pending(ids)
        assert adder.observe(ids, obs, rewards, terminated, truncated) == pending
        actions = rng.integers(0, 2, len(ids))
        adder.record_actions(ids, acted(actions))
        env.send(actions, ids)
        for i, env_id in enumerate(ids):
            truth[env_id, steps[env_id]] = (obs[i].copy(), rewards[i], terminated[i],
                                            truncated[i], actions[i])
            steps[env_id] += 1
    env.close()

    assert replay.head.tolist() == (steps - 1).tolist()  # an env's first obs is not a step yet
    assert (steps > per_stream).all()  # every ring wrapped
    sampleable = {(e, p) for e in range(num_envs)
                  for p in range(steps[e] - 1 - per_stream, steps[e] - 1 - N_STEP)
                  if expected_transition(truth, e, p) is not None}
    assert replay.num_sampleable == len(sampleable)

    seen, discounts = set(), []
    for _ in range(4):
        batch = replay.sample(256)
        positions, streams = np.divmod(batch["keys"], num_envs)
        for i, (env_id, step) in enumerate(zip(streams.tolist(), positions.tolist())):
            assert (env_id, step) in sampleable
            obs, action, ret, discount, next_obs = expected_transition(truth, env_id, step)
            np.testing.assert_array_equal(batch["obs"][i], obs)
            assert batch["actions"][i] == action
            assert batch["rewards"][i] == pytest.approx(ret, rel=1e-6)
            assert batch["discounts"][i] == pytest.approx(discount, rel=1e-6)
            np.testing.assert_array_equal(batch["next_obs"][i], next_obs)
            seen.add((env_id, step))
            discounts.append(discount)
    # The batches covered terminations, truncations inside the window and plain windows.
    assert set(np.round([0.0, GAMMA, GAMMA**2, GAMMA**3], 6)) <= set(np.round(discounts, 6))
    assert len(seen) > 0.5 * len(sampleable)


def hand_adder(n_step=1):
    # Three streams; the adder's two envs are streams 1 and 2.
    replay = Replay(30, 3, (1,), np.float32, (), np.int64, n_step, 0.5, seed=0)
    return replay, NStepAdder(replay, 1, 2, (1,), np.float32, (), np.int64)


def slots(replay, stream):
    """(obs, action, reward, terminated, truncated, applied) of each step in a stream."""
    head = replay.head[stream]
    return list(zip(replay.obs[stream, :head, 0].tolist(), replay.actions[stream, :head].tolist(),
                    replay.rewards[stream, :head].tolist(),
                    replay.terminated[stream, :head].tolist(),
                    replay.truncated[stream, :head].tolist(),
                    replay.applied[stream, :head].tolist()))


def test_hand_made_sequence_in_any_env_order():
    replay, adder = hand_adder()
    F, T = False, True
    # Each row: env ids, their obs, rewards, terminated, truncated; then the actions sent.
    batches = [
        ([1, 0], [100, 0], [0, 0], [F, F], [F, F], [110, 10]),
        ([0], [1], [1.0], [F], [F], [11]),
        ([0], [2], [2.0], [T], [F], [12]),
        ([1, 0], [101, 3], [5.0, 0.0], [F, F], [T, F], [111, 13]),  # env 0: reset step
        ([1], [102], [0.0], [F], [F], [112]),  # env 1: reset step after its truncation
        ([0], [4], [3.0], [F], [F], [14]),
    ]
    inserted = []
    for ids, obs, rewards, terminated, truncated, actions in batches:
        pending = adder.pending(ids)
        inserted.append(adder.observe(ids, np.array(obs, np.float32)[:, None], rewards,
                                      terminated, truncated))
        assert inserted[-1] == pending
        adder.record_actions(ids, acted(actions))
    assert inserted == [0, 1, 1, 2, 1, 1]
    assert replay.head.tolist() == [0, 4, 2]
    assert slots(replay, 1) == [
        (0, 10, 1.0, F, F, T),
        (1, 11, 2.0, T, F, T),
        (2, 12, 0.0, F, F, F),  # final obs: its action was never applied
        (3, 13, 3.0, F, F, T),
    ]
    assert slots(replay, 2) == [
        (100, 110, 5.0, F, T, T),
        (101, 111, 0.0, F, F, F),
    ]


def test_reset_cuts_the_streams():
    replay, adder = hand_adder(n_step=2)
    for t in range(5):
        adder.observe([0], [[t]], [1.0], [False], [False])
        adder.record_actions([0], acted([t]))
    adder.reset()  # obs 4 was never answered: step 3 must not lead into the next episode
    assert adder.pending([0]) == 0
    for t in range(100, 104):
        assert adder.observe([0], [[t]], [1.0], [False], [False]) == (t > 100)
        adder.record_actions([0], acted([t]))
    assert replay.applied[1, :replay.head[1]].tolist() == [True] * 3 + [False] + [True] * 3
    batch = replay.sample(64)
    obs, next_obs = batch["obs"][:, 0], batch["next_obs"][:, 0]
    assert set(zip(obs.tolist(), next_obs.tolist())) == {(0, 2), (1, 3), (2, 3), (100, 102)}
    assert (batch["discounts"][obs == 2] == 0.5).all()  # bootstraps from obs 3 after one step


def test_out_of_order_calls_raise():
    _, adder = hand_adder()
    with pytest.raises(RuntimeError, match="observe"):
        adder.record_actions([0], acted([1]))
    adder.observe([0], [[0]], [0.0], [False], [False])
    with pytest.raises(RuntimeError, match="record_actions"):
        adder.observe([0], [[1]], [0.0], [False], [False])
    with pytest.raises(ValueError, match="streams"):
        NStepAdder(Replay(30, 3, (1,), np.float32, (), np.int64, 1, 0.5), 2, 2, (1,), np.float32,
                   (), np.int64)
