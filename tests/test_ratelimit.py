import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.ratelimit import LimiterStopped, RateLimiter

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
