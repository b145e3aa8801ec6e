import asyncio
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.replay import Replay
from asyncrl.sequence import SequenceReplay

EPS = 1e-9
TIMEOUT_S = 5.0


def ceiling(limiter: RateLimiter, max_insert: int) -> float:
    """The highest diff the limiter guarantees (see the RateLimiter docstring)."""
    top = max(limiter.max_diff, limiter.min_diff + limiter.sample_batch_size)
    return top + max_insert * limiter.samples_per_insert


def assert_in_band(limiter: RateLimiter, max_insert: int) -> None:
    assert limiter.diff <= ceiling(limiter, max_insert) + EPS
    if limiter.samples:
        assert limiter.diff >= limiter.min_diff - EPS


limiter_args = st.tuples(
    st.sampled_from([0.25, 0.5, 1.0, 2.0, 8.0, 32.0]),  # samples_per_insert
    st.integers(1, 50),  # min_size_to_sample
    st.sampled_from([0.0, 0.5, 1.0, 5.0, 100.0]),  # error_buffer
    st.integers(1, 32),  # sample_batch_size
)


@settings(max_examples=200, deadline=None)
@given(limiter_args, st.integers(1, 16), st.lists(st.tuples(st.booleans(), st.integers(1, 32))))
def test_diff_stays_in_band_under_any_interleaving(args, max_insert, ops):
    limiter = RateLimiter(*args)
    for is_insert, size in ops:
        if is_insert:
            limiter.try_insert(min(size, max_insert))
        else:
            limiter.try_sample(min(size, limiter.sample_batch_size))
        assert_in_band(limiter, max_insert)


@settings(max_examples=200, deadline=None)
@given(limiter_args, st.integers(1, 16), st.randoms(use_true_random=False))
def test_serial_loop_always_progresses(args, max_insert, rng):
    limiter = RateLimiter(*args)
    for _ in range(100):
        inserted = limiter.try_insert(rng.randint(1, max_insert))
        sampled = 0
        while limiter.try_sample():
            sampled += 1
        # The deadlock rule: when an insert is refused, a full sample batch must be possible.
        assert inserted or sampled
        assert_in_band(limiter, max_insert)


async def run_pair(limiter: RateLimiter, max_insert: int, sample_batches: int, producers: int):
    """Producers insert until stopped; the consumer samples ``sample_batches``, then stops."""
    rng = random.Random(0)

    async def nap():
        if rng.random() < 0.2:
            await asyncio.sleep(rng.random() * 1e-3)
        else:
            await asyncio.sleep(0)

    async def produce():
        try:
            while True:
                await limiter.await_insert(rng.randint(1, max_insert))
                assert_in_band(limiter, max_insert)
                await nap()
        except LimiterStopped:
            pass

    async def consume():
        for _ in range(sample_batches):
            await limiter.await_sample()
            assert_in_band(limiter, max_insert)
            await nap()
        limiter.stop()

    async with asyncio.TaskGroup() as group:
        for _ in range(producers):
            group.create_task(produce())
        group.create_task(consume())


@pytest.mark.parametrize(
    "samples_per_insert, min_size, error_buffer, batch, max_insert, producers",
    [
        (0.25, 10, 8.0, 4, 8, 1),  # spi < 1
        (8.0, 20, 64.0, 32, 4, 1),  # spi > 1
        (1.0, 5, 0.5, 8, 16, 1),  # error buffer smaller than one insert batch
        (4.0, 1, 0.0, 16, 8, 3),  # no buffer at all, several producers
        (2.0, 50, 30.0, 16, 1, 2),
    ],
)
def test_async_pair_finishes_without_deadlock(
    samples_per_insert, min_size, error_buffer, batch, max_insert, producers
):
    limiter = RateLimiter(samples_per_insert, min_size, error_buffer, batch)
    asyncio.run(asyncio.wait_for(run_pair(limiter, max_insert, 300, producers), TIMEOUT_S))
    assert limiter.samples == 300 * batch
    ratio = limiter.samples / limiter.inserts
    # |diff| is bounded, so the ratio converges; 300 batches bring it within 15%.
    assert ratio == pytest.approx(samples_per_insert, rel=0.15)
    assert limiter.stats()["samples"] == limiter.samples


def test_stop_releases_a_blocked_sampler():
    async def main():
        limiter = RateLimiter(1.0, 10, 0.0, 4)
        sampler = asyncio.create_task(limiter.await_sample())
        await asyncio.sleep(0.01)
        assert not sampler.done()
        limiter.stop()
        with pytest.raises(LimiterStopped):
            await asyncio.wait_for(sampler, TIMEOUT_S)
        assert limiter.stopped and limiter.sample_waits == 1 and limiter.sample_wait_s > 0
        limiter.try_insert(20)
        with pytest.raises(LimiterStopped):  # even when it would not have to wait
            await limiter.await_sample()

    asyncio.run(main())


def test_stop_releases_a_blocked_inserter():
    async def main():
        limiter = RateLimiter(1.0, 1, 0.0, 1)
        while limiter.try_insert(1):
            pass
        inserter = asyncio.create_task(limiter.await_insert(1))
        await asyncio.sleep(0.01)
        assert not inserter.done()
        limiter.stop()
        with pytest.raises(LimiterStopped):
            await asyncio.wait_for(inserter, TIMEOUT_S)
        assert limiter.insert_waits == 1 and limiter.insert_wait_s > 0
        with pytest.raises(LimiterStopped):
            await limiter.await_insert(1)
        assert not limiter.try_insert(1) and limiter.try_sample()  # try_* never wait: unaffected

    asyncio.run(main())


def test_a_sample_wakes_a_blocked_inserter():
    async def main():
        limiter = RateLimiter(1.0, 1, 0.0, 1)
        while limiter.try_insert(1):
            pass
        inserter = asyncio.create_task(limiter.await_insert(1))
        await asyncio.sleep(0)
        inserts = limiter.inserts
        assert limiter.try_sample()
        await asyncio.wait_for(inserter, TIMEOUT_S)
        assert limiter.inserts == inserts + 1  # recorded by the waiter itself

    asyncio.run(main())


def test_cancelled_waiter_is_counted_and_leaves_no_trace():
    async def main():
        limiter = RateLimiter(1.0, 10, 0.0, 4)
        sampler = asyncio.create_task(limiter.await_sample())
        await asyncio.sleep(0)
        sampler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sampler
        assert limiter.samples == 0 and limiter.sample_waits == 1
        assert limiter.try_insert(14) and limiter.try_sample()

    asyncio.run(main())


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.0, 1, 0.0, 1), "samples_per_insert"),
        ((1.0, 0, 0.0, 1), "min_size_to_sample"),
        ((1.0, 1, -1.0, 1), "error_buffer"),
        ((1.0, 1, 0.0, 0), "sample_batch_size"),
    ],
)
def test_constructor_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        RateLimiter(*args)


def test_rejects_bad_sizes():
    limiter = RateLimiter(1.0, 1, 10.0, 4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        limiter.try_insert(0)
    with pytest.raises(ValueError, match="sample_batch_size"):
        limiter.try_sample(5)


# --- sampling waits for something sampleable ----------------------------------------------------


def test_sampling_waits_for_a_sampleable_item():
    drawable = [0]
    limiter = RateLimiter(1.0, 8, 0.0, 4, sampleable=lambda: drawable[0])
    assert limiter.try_insert(100)  # far past min_size_to_sample and max_diff
    assert not limiter.can_sample() and not limiter.try_sample()
    assert limiter.can_insert(50)  # the sampler cannot move, so the inserter may
    drawable[0] = 1
    assert limiter.try_sample() and limiter.samples == 4


@settings(max_examples=200, deadline=None)
@given(limiter_args, st.integers(1, 16), st.integers(0, 200), st.randoms(use_true_random=False))
def test_serial_loop_progresses_while_nothing_is_sampleable(args, max_insert, lag, rng):
    # Items become drawable ``lag`` inserts after they were inserted, as n-step transitions do.
    limiter = RateLimiter(*args, sampleable=lambda: max(0, limiter.inserts - lag))
    for _ in range(100):
        inserted = limiter.try_insert(rng.randint(1, max_insert))
        sampled = 0
        while limiter.try_sample():
            sampled += 1
        assert inserted or sampled
        assert_in_band(limiter, max(max_insert, lag + max_insert))


def n_step_replay(streams: int, n_step: int) -> Replay:
    return Replay(64 * streams, streams, (1,), np.float32, (), np.int64, n_step, 0.9, seed=0)


def sequence_replay(streams: int, length: int) -> SequenceReplay:
    return SequenceReplay(64 * streams, streams, (1,), np.float32, (), np.int64, length, length // 2,
                          seed=0)


REPLAYS = [lambda: n_step_replay(8, 3), lambda: sequence_replay(8, 10)]


def insert_all(replay: Replay | SequenceReplay) -> None:
    streams = np.arange(replay.num_streams)
    zeros = np.zeros(len(streams), bool)
    replay.insert(streams, np.zeros((len(streams), 1)), np.zeros(len(streams), np.int64),
                  np.ones(len(streams)), zeros, zeros, ~zeros)


@pytest.mark.parametrize("make", REPLAYS, ids=["n_step", "sequence"])
def test_serial_trainer_loop_never_samples_an_empty_replay(make):
    # 8 streams, n = 3, min_size_to_sample = 8: sampling opened after one step per stream and
    # the first draw raised "nothing to sample yet".
    replay = make()
    batch = 16
    limiter = RateLimiter(4.0, 8, 8.0, batch, sampleable=lambda: replay.num_sampleable)
    draws = 0
    for _ in range(60):  # the order of Trainer._run_serial
        while not limiter.try_insert(replay.num_streams):
            assert limiter.try_sample(batch), "rate limiter refuses both insert and sample"
            replay.sample(batch)
            draws += 1
        insert_all(replay)
        while limiter.try_sample(batch):
            replay.sample(batch)
            draws += 1
    assert draws > 0 and limiter.samples == draws * batch


@pytest.mark.parametrize("make", REPLAYS, ids=["n_step", "sequence"])
def test_async_actors_and_learner_never_sample_an_empty_replay(make):
    replay = make()
    batch = 16
    limiter = RateLimiter(4.0, 8, 8.0, batch, sampleable=lambda: replay.num_sampleable)

    async def actor():
        try:
            while True:
                await limiter.await_insert(replay.num_streams)
                insert_all(replay)  # before yielding to the loop, as the actors do
                await asyncio.sleep(0)
        except LimiterStopped:
            pass

    async def learner():
        for _ in range(50):
            await limiter.await_sample(batch)
            replay.sample(batch)
            await asyncio.sleep(0)
        limiter.stop()

    async def main():
        async with asyncio.TaskGroup() as group:
            group.create_task(actor())
            group.create_task(learner())

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert limiter.samples == 50 * batch


def test_state_dict_round_trip():
    limiter = RateLimiter(2.0, 10, 4.0, 8)
    for _ in range(20):
        limiter.try_insert(3)
        limiter.try_sample()
    state = limiter.state_dict()
    assert all(type(v) is int for v in state.values())  # plain data for the checkpoint manifest
    restored = RateLimiter(2.0, 10, 4.0, 8)
    restored.load_state_dict(state)
    assert (restored.inserts, restored.samples, restored.diff) == (limiter.inserts, limiter.samples, limiter.diff)
    assert restored.can_sample() == limiter.can_sample() and restored.can_insert(3) == limiter.can_insert(3)
    with pytest.raises(ValueError, match="integers"):
        restored.load_state_dict({"inserts": -1, "samples": 0})


@pytest.mark.parametrize("mode", ["serial", "async"])
def test_a_run_whose_min_size_is_below_one_n_step_per_stream_trains(tmp_path, mode):
    # The run died in replay.sample ("nothing to sample yet") before anything was sampleable.
    from asyncrl.trainer import Trainer

    trainer = Trainer.from_algo("dqn", overrides=[
        "env.num_envs=8", "algo.n_step=3", "replay.min_size_to_sample=8", "learner.batch_size=16",
        f"train.mode='{mode}'", "actors.placement='inline'", "train.total_env_steps=400",
        "train.eval_every=400", "train.eval_episodes=1", "train.checkpoint_every=400"],
        run_dir=tmp_path)
    asyncio.run(asyncio.wait_for(trainer.run(), 60))
    assert trainer.c.recorder.updates > 0
