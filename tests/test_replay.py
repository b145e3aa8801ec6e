import json

import numpy as np
import pytest

from asyncrl.replay import Replay

PLAIN = (1.0, False, False, True)  # reward, terminated, truncated, applied


def make_replay(capacity, num_streams=1, n_step=1, gamma=0.5, **kwargs) -> Replay:
    # obs = (stream, position): every sampled observation says which slot it came from.
    return Replay(capacity, num_streams, (2,), np.float32, (), np.int64, n_step, gamma,
                  seed=0, **kwargs)


def insert_steps(replay: Replay, stream: int, steps) -> None:
    for reward, terminated, truncated, applied in steps:
        position = replay.head[stream]
        replay.insert([stream], [[stream, position]], [position], [reward], [terminated],
                      [truncated], [applied])


def decode(replay: Replay, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions, streams = np.divmod(keys, replay.num_streams)
    return streams, positions


def sampled_counts(replay: Replay, draws: int, batch_size: int = 500, **kwargs) -> np.ndarray:
    counts = np.zeros(replay.capacity, np.int64)
    for _ in range(draws // batch_size):
        streams, positions = decode(replay, replay.sample(batch_size, **kwargs)["keys"])
        np.add.at(counts, streams * replay.stream_capacity + positions % replay.stream_capacity, 1)
    return counts


def chi_square_ok(counts: np.ndarray, expected: np.ndarray) -> bool:
    df = len(counts) - 1
    return ((counts - expected) ** 2 / expected).sum() <= df + 5 * np.sqrt(2 * df)


def test_n_step_returns_by_hand():
    replay = make_replay(32, n_step=3, gamma=0.5)
    insert_steps(replay, 0, [
        (1.0, False, False, True),  # 0
        (2.0, False, False, True),  # 1
        (4.0, True, False, True),  # 2: terminates
        (0.0, False, False, False),  # 3: final obs; EnvPool's reset step ignored the action
        (1.0, False, False, True),  # 4
        (1.0, False, False, True),  # 5
        (1.0, False, True, True),  # 6: truncated
        (0.0, False, False, False),  # 7: final obs
        (1.0, False, False, True),  # 8
        (2.0, False, False, True),  # 9
        (3.0, False, False, True),  # 10: no 3 successors yet, like 11 and 12
        (4.0, False, False, True),  # 11
        (5.0, False, False, True),  # 12
    ])
    expected = {  # start position: (n-step return, discount, next position)
        0: (1 + 0.5 * 2 + 0.25 * 4, 0.0, 3),
        1: (2 + 0.5 * 4, 0.0, 3),
        2: (4.0, 0.0, 3),
        4: (1 + 0.5 + 0.25, 0.125, 7),
        5: (1 + 0.5, 0.25, 7),
        6: (1.0, 0.5, 7),
        8: (1 + 0.5 * 2 + 0.25 * 3, 0.125, 11),
        9: (2 + 0.5 * 3 + 0.25 * 4, 0.125, 12),
    }
    assert replay.num_sampleable == len(expected)
    batch = replay.sample(256)
    _, positions = decode(replay, batch["keys"])
    assert set(positions.tolist()) == set(expected)
    for i, position in enumerate(positions):
        reward, discount, next_position = expected[position]
        assert batch["obs"][i].tolist() == [0, position]
        assert batch["actions"][i] == position
        assert batch["rewards"][i] == pytest.approx(reward)
        assert batch["discounts"][i] == pytest.approx(discount)
        assert batch["next_obs"][i].tolist() == [0, next_position]
    for name in ("rewards", "discounts", "weights"):
        assert batch[name].dtype == np.float32
    assert batch["keys"].dtype == np.int64


def test_cut_stream_bootstraps_from_its_last_observation_only():
    replay = make_replay(32, n_step=3, gamma=0.5)
    insert_steps(replay, 0, [PLAIN] * 5)
    replay.cut([0])  # step 4's successor never comes (say its env was reset)
    insert_steps(replay, 0, [PLAIN] * 6)
    expected = {
        0: (1.75, 0.125, 3), 1: (1.75, 0.125, 4), 2: (1.5, 0.25, 4), 3: (1.0, 0.5, 4),
        5: (1.75, 0.125, 8), 6: (1.75, 0.125, 9), 7: (1.75, 0.125, 10),
    }
    batch = replay.sample(256)
    _, positions = decode(replay, batch["keys"])
    assert set(positions.tolist()) == set(expected)
    got = zip(positions, batch["rewards"], batch["discounts"], batch["next_obs"][:, 1])
    for position, reward, discount, next_position in got:
        assert (reward, discount, next_position) == pytest.approx(expected[position])


def test_ring_wraps_per_stream():
    replay = make_replay(20, num_streams=3, n_step=2)  # 6 slots per stream, 2 unused
    assert (replay.capacity, replay.stream_capacity) == (18, 6)
    for lengths in [(3, 3, 3), (4, 4, 0), (13, 0, 0)]:
        for step in range(max(lengths)):
            streams = [s for s in range(3) if step < lengths[s]]
            positions = replay.head[streams]
            replay.insert(streams, np.stack([streams, positions], 1), positions,
                          np.ones(len(streams)), np.zeros(len(streams), bool),
                          np.zeros(len(streams), bool), np.ones(len(streams), bool))
    assert replay.head.tolist() == [20, 7, 3]
    assert replay.size == 6 + 6 + 3 and replay.fill == pytest.approx(15 / 18)
    # Sampleable: written, not overwritten, and 2 successors present.
    expected = {(0, p) for p in range(14, 18)} | {(1, p) for p in range(1, 5)} | {(2, 0)}
    assert replay.num_sampleable == len(expected)
    batch = replay.sample(300)
    streams, positions = decode(replay, batch["keys"])
    assert set(zip(streams.tolist(), positions.tolist())) == expected
    np.testing.assert_array_equal(batch["obs"], np.stack([streams, positions], 1))
    np.testing.assert_array_equal(batch["next_obs"], np.stack([streams, positions + 2], 1))


def test_uniform_sampling_over_sampleable_slots():
    replay = make_replay(80, num_streams=2, n_step=1)
    episode = [PLAIN] * 3 + [(1.0, True, False, True), (0.0, False, False, False)]
    for stream in range(2):
        insert_steps(replay, stream, episode * 6)  # 30 steps in a 40-slot ring
    counts = sampled_counts(replay, 20_000)
    valid = np.zeros(80, bool)
    for stream in range(2):
        valid[stream * 40 + np.arange(29)] = [applied for *_, applied in episode * 6][:29]
    assert replay.num_sampleable == valid.sum() == 2 * (29 - 5)
    assert counts[~valid].sum() == 0
    assert chi_square_ok(counts[valid], np.full(valid.sum(), 20_000 / valid.sum()))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_update_priorities_changes_frequencies(alpha):
    replay = make_replay(20, priority_exponent=alpha)
    insert_steps(replay, 0, [PLAIN] * 11)  # positions 0..9 sampleable
    priorities = np.array([1.0, 9.0, 0.0, 3.0, 0.5, 1.0, 2.0, 4.0, 0.2, 1.0])
    replay.update_priorities(np.arange(10), priorities)  # key = position with one stream
    leaves = (priorities + replay.priority_eps) ** alpha
    counts = sampled_counts(replay, 30_000)[:10]
    assert chi_square_ok(counts, 30_000 * leaves / leaves.sum())
    assert replay.max_priority == pytest.approx(9.0)
    insert_steps(replay, 0, [PLAIN])  # position 10 joins at the highest priority so far
    assert replay.state_dict()["priorities"][10] == pytest.approx(9.0 ** alpha)


def test_stale_keys_are_ignored():
    replay = make_replay(6, priority_exponent=1.0)
    insert_steps(replay, 0, [PLAIN] * 6)
    keys = replay.sample(50)["keys"]
    insert_steps(replay, 0, [PLAIN] * 4)  # overwrites positions 0..3; 4 stays sampleable
    assert set(decode(replay, keys)[1].tolist()) == {0, 1, 2, 3, 4}
    before = replay.state_dict()["priorities"]
    replay.update_priorities(keys, np.full(len(keys), 100.0))
    after = replay.state_dict()["priorities"]
    changed = np.flatnonzero(after != before)
    assert changed.tolist() == [4] and replay.max_priority == pytest.approx(100.0)
    # Position 9 is written but lacks a successor: a key for it must not make it sampleable.
    replay.update_priorities([9], [5.0])
    assert replay.num_sampleable == 5 and replay.state_dict()["priorities"][9 % 6] == 0


def test_importance_weights_follow_the_formula():
    replay = make_replay(20, priority_exponent=0.7)
    insert_steps(replay, 0, [PLAIN] * 11)
    priorities = np.linspace(0.1, 3.0, 10)
    replay.update_priorities(np.arange(10), priorities)
    batch = replay.sample(64, importance_exponent=0.4)
    leaves = (priorities + replay.priority_eps) ** 0.7
    probs = leaves[batch["keys"]] / leaves.sum()
    weights = (10 * probs) ** -0.4
    np.testing.assert_allclose(batch["weights"], weights / weights.max(), rtol=1e-6)
    assert (replay.sample(64)["weights"] == 1).all()  # beta 0
    uniform = make_replay(20)
    insert_steps(uniform, 0, [PLAIN] * 11)
    uniform.update_priorities(np.arange(10), priorities)  # a no-op without priorities
    assert (uniform.sample(64, importance_exponent=1.0)["weights"] == 1).all()


def test_several_batches_in_one_draw_normalise_weights_per_batch():
    replay = make_replay(20, priority_exponent=0.7)
    insert_steps(replay, 0, [PLAIN] * 11)
    priorities = np.linspace(0.1, 3.0, 10)
    replay.update_priorities(np.arange(10), priorities)
    drawn = replay.sample(16, importance_exponent=0.4, batches=3)
    assert all(len(v) == 48 for v in drawn.values())
    leaves = (priorities + replay.priority_eps) ** 0.7
    weights = (leaves[drawn["keys"]] / leaves.sum() * 10) ** -0.4
    for block in range(3):  # each batch's weights over that batch's own maximum
        rows = slice(16 * block, 16 * (block + 1))
        np.testing.assert_allclose(drawn["weights"][rows], weights[rows] / weights[rows].max(), rtol=1e-6)
    # The rows themselves are n-step transitions like a single batch's.
    streams, positions = decode(replay, drawn["keys"])
    np.testing.assert_array_equal(drawn["obs"][:, 1], positions)
    np.testing.assert_array_equal(drawn["next_obs"][:, 1], positions + 1)


def all_arrays(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            yield value
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("asyncrl"):
            yield from all_arrays(value, seen)


def test_frames_are_stored_once():
    frame_shape, num_streams, per_stream = (4, 84, 84), 2, 16
    replay = Replay(num_streams * per_stream, num_streams, frame_shape, np.uint8, (), np.int64,
                    n_step=3, gamma=0.99, seed=0)
    frames = np.random.default_rng(0).integers(0, 256, (num_streams, 20, *frame_shape), np.uint8)
    for t in range(20):
        replay.insert([0, 1], frames[:, t], [t, t], [0.0, 0.0], [False, False], [False, False],
                      [True, True])
    frame_bytes = np.prod(frame_shape)
    assert replay.obs.nbytes == num_streams * per_stream * frame_bytes
    others = [a for a in all_arrays(replay) if a is not replay.obs]
    assert len(others) >= 7 and all(a.nbytes < frame_bytes for a in others)
    batch = replay.sample(32)
    streams, positions = decode(replay, batch["keys"])
    np.testing.assert_array_equal(batch["obs"], frames[streams, positions])
    np.testing.assert_array_equal(batch["next_obs"], frames[streams, positions + 3])


def test_state_dict_round_trip():
    original = make_replay(24, num_streams=2, n_step=2, priority_exponent=0.6)
    episodes = ([PLAIN] * 4 + [(1.0, False, True, True), (0.0, False, False, False)]) * 4
    insert_steps(original, 0, episodes[:21])  # wraps its 12 slots
    insert_steps(original, 1, episodes[:9])
    keys = np.array([14 * 2 + 0, 9 * 2 + 0, 3 * 2 + 1, 6 * 2 + 1])  # position * streams + stream
    original.update_priorities(keys, [5.0, 0.5, 2.0, 7.0])
    original.sample(8, 0.5)  # its RNG moves on: the restored one must continue from there
    # As a checkpoint keeps it: arrays copied, the rest through JSON.
    state = {name: np.array(value, copy=True) if isinstance(value, np.ndarray)
             else json.loads(json.dumps(value)) for name, value in original.state_dict().items()}
    restored = Replay(24, 2, (2,), np.float32, (), np.int64, 2, 0.5, priority_exponent=0.6, seed=1)
    restored.load_state_dict(state)
    for name in Replay._ARRAYS:
        np.testing.assert_array_equal(getattr(restored, name), getattr(original, name))
    np.testing.assert_array_equal(restored._tree.tree, original._tree.tree)
    assert restored.max_priority == original.max_priority == pytest.approx(7.0 + 1e-6)
    assert (restored.num_sampleable, restored.size) == (original.num_sampleable, original.size)
    a, b = original.sample(64, 0.5), restored.sample(64, 0.5)  # other seeds, same state
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ValueError, match="another capacity"):
        make_replay(30, num_streams=2, n_step=2).load_state_dict(state)


@pytest.mark.parametrize("kind", ["transitions", "sequences"])
def test_a_replay_saved_while_a_worker_writes_ahead_holds_no_step_past_its_head(kind):
    """A worker process writes steps ahead of the published head while the loop saves the
    replay. A slot it writes between two reads of the live positions must not enter the saved
    state as published: the resumed run would overwrite it (seen in test_sigkill_mid_run_then_resume
    under load: saved heads 262, saved positions up to 268)."""
    from asyncrl.sequence import SequenceReplay

    if kind == "transitions":
        replay = make_replay(32, num_streams=2, writers_ahead=4)
    else:
        replay = SequenceReplay(32, 2, (2,), np.float32, (), np.int64, 4, 2, writers_ahead=3)
    for _ in range(5):
        replay.insert([0, 1], [[0, 0], [1, 0]], [0, 0], [1.0, 1.0], [False, False], [False, False], [True, True])
    live = replay.positions

    class Racing(np.ndarray):
        """Live positions that a worker writes into as soon as they are compared."""

        def __ge__(self, other):
            compared = np.asarray(self) >= other
            head = int(replay.head[1])
            live[1, (head + 1) % replay.stream_capacity] = head + 1  # one step ahead of the head
            return compared

    replay.positions = live.view(Racing)
    state = replay.state_dict()
    saved, head = np.asarray(state["positions"]), np.asarray(state["head"])
    assert live[1, 6] == 6  # the worker did write ahead meanwhile
    assert (saved < head[:, None]).all(), (saved, head)


def test_readable_errors():
    with pytest.raises(ValueError, match="at least 5"):
        make_replay(8, num_streams=2, n_step=3)
    replay = make_replay(10, n_step=3)
    insert_steps(replay, 0, [(0.0, False, False, False)] + [PLAIN] * 2)
    with pytest.raises(ValueError, match="nothing to sample"):
        replay.sample(4)
    insert_steps(replay, 0, [PLAIN])  # step 0 has its successors but was not applied
    with pytest.raises(ValueError, match="nothing to sample"):
        replay.sample(4)


def fill_streams(replay: Replay, steps: int) -> None:
    """``steps`` plain steps in every stream, inserted in lockstep as the actors do."""
    streams = np.arange(replay.num_streams)
    ones, zeros = np.ones(len(streams)), np.zeros(len(streams), bool)
    for _ in range(steps):
        positions = replay.head[streams]
        replay.insert(streams, np.stack([streams, positions], 1), positions, ones, zeros, zeros,
                      ~zeros)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_each_batch_of_a_multi_batch_draw_spans_the_streams(alpha):
    # One stratified pass over 8 batches' worth of items, cut into consecutive batches, gave
    # batch i only the leaves of stream i.
    replay = make_replay(8 * 32, num_streams=8, n_step=3, priority_exponent=alpha)
    fill_streams(replay, 24)
    rng = np.random.default_rng(1)
    keys = np.arange(21)[:, None] * 8 + np.arange(8)  # every sampleable slot
    replay.update_priorities(keys.ravel(), rng.uniform(0.1, 5.0, keys.size))
    leaves = replay.state_dict()["priorities"].reshape(8, -1).sum(axis=1)
    expected = leaves / leaves.sum()  # each stream's share of a single draw
    rounds, batch = 100, 32
    counts = np.zeros((8, 8))
    for _ in range(rounds):
        streams, _ = decode(replay, replay.sample(batch, batches=8)["keys"])
        for b, rows in enumerate(streams.reshape(8, batch)):
            counts[b] += np.bincount(rows, minlength=8)
    for b in range(8):
        assert chi_square_ok(counts[b], rounds * batch * expected), (b, counts[b])
    streams, _ = decode(replay, replay.sample(batch, batches=8)["keys"])
    assert all(len(set(rows.tolist())) >= 6 for rows in streams.reshape(8, batch))


def test_a_multi_batch_draw_is_as_many_single_draws():
    # Stratified by priority, so the batches and their importance weights are exactly those
    # of separate calls from the same random numbers.
    def build() -> Replay:
        replay = make_replay(8 * 32, num_streams=8, n_step=3, priority_exponent=0.6)
        fill_streams(replay, 24)
        keys = np.arange(21 * 8)
        replay.update_priorities(keys, np.random.default_rng(2).uniform(0.1, 5.0, keys.size))
        return replay

    one, separate = build(), build()
    drawn = one.sample(16, importance_exponent=0.4, batches=4)
    calls = [separate.sample(16, importance_exponent=0.4) for _ in range(4)]
    for name in drawn:
        np.testing.assert_array_equal(drawn[name], np.concatenate([c[name] for c in calls]))
    assert all(c["weights"].max() == 1 for c in calls)
