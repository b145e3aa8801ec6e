"""The vector-env API over EnvPool (sync and async mode) and Gymnasium."""

from __future__ import annotations

import asyncio
import threading
import time

import envpool
import gymnasium
import numpy as np
import pytest

from asyncrl.envs import EnvError, Step, VecEnv, list_env_ids, make_env


class Countdown(gymnasium.Env):
    """Terminates after ``length`` steps with reward 1 per step; records the threads that ran it."""

    observation_space = gymnasium.spaces.Box(-10.0, 10.0, (2,), np.float64)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float64)
    threads: list[int] = []

    def __init__(self, length: int = 3, delay: float = 0.0) -> None:
        self.length, self.delay, self.t = length, delay, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        Countdown.threads.append(threading.get_ident())
        self.t = 0
        return np.zeros(2), {}

    def step(self, action):
        assert action.dtype == np.float64  # the adapter casts float32 actions to the space's dtype
        time.sleep(self.delay)
        Countdown.threads.append(threading.get_ident())
        self.t += 1
        return np.full(2, self.t, np.float64), 1.0, self.t == self.length, False, {}


def random_actions(env: VecEnv, n: int, rng: np.random.Generator) -> np.ndarray:
    spec = env.spec
    if spec.action_kind == "discrete":
        return rng.integers(0, spec.num_actions, n, dtype=np.int64)
    return rng.uniform(spec.action_low, spec.action_high, (n, *spec.action_shape)).astype(np.float32)


def drive(env: VecEnv, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, Step]:
    """recv/send ``steps`` times checking next-step auto-reset; returns the recvs, sends and
    (terminated, truncated) episode ends per env, and the last step, left unanswered."""
    rng = np.random.default_rng(seed)
    recvs, sends = np.zeros(env.num_envs, int), np.zeros(env.num_envs, int)
    ends = np.zeros((env.num_envs, 2), int)
    ended = np.ones(env.num_envs, bool)  # the reset batch looks like the step after an episode end
    env.async_reset()
    for i in range(steps + 1):
        step = env.recv()
        ids = step.env_ids
        assert step.rewards.dtype == np.float32 and step.env_ids.dtype == np.int64
        assert step.terminated.dtype == bool and step.truncated.dtype == bool
        assert len(np.unique(ids)) == len(ids) == env.batch_size
        restarted = ended[ids]
        assert (step.rewards[restarted] == 0).all()
        assert not (step.terminated[restarted] | step.truncated[restarted]).any()
        ended[ids] = step.terminated | step.truncated
        recvs[ids] += 1
        ends[ids] += np.stack([step.terminated, step.truncated], axis=1)
        if i < steps:
            env.send(random_actions(env, len(ids), rng), ids)
            sends[ids] += 1
    return recvs, sends, ends, step


def test_envpool_sync_cartpole():
    with make_env("CartPole-v1", num_envs=4, seed=1) as env:
        assert (env.num_envs, env.batch_size) == (4, 4)
        spec = env.spec
        assert (spec.action_kind, spec.num_actions, spec.action_shape) == ("discrete", 2, ())
        assert (spec.obs_shape, spec.obs_dtype, spec.max_episode_steps) == ((4,), np.float32, 500)
        env.async_reset()
        first = env.recv()
        assert first.obs.shape == (4, 4) and first.obs.dtype == np.float32
        assert first.env_ids.tolist() == [0, 1, 2, 3]
        assert not first.rewards.any() and not first.terminated.any() and not first.truncated.any()
        env.send(np.zeros(4, np.int64), first.env_ids)
        assert (env.recv().rewards == 1).all()
        env.send(np.zeros(4, np.int64), np.arange(4))
        env.recv()
        # Sync mode: a new episode may start from any recv.
        recvs, _, ends, _ = drive(env, 150)
        assert (recvs == 151).all() and ends[:, 0].min() >= 2  # random play ends in ~20 steps


def test_envpool_async_cartpole():
    with make_env("CartPole-v1", num_envs=6, batch_size=2) as env:
        assert (env.num_envs, env.batch_size) == (6, 2)
        recvs, sends, ends, last = drive(env, 300)
        assert recvs.min() > 20 and ends[:, 0].min() >= 1  # every env got stepped, none starved
        # Each env was received once after reset and once per action sent to it, except that the
        # envs sent to but not yet received are still stepping; the last batch awaits its actions.
        awaiting = np.zeros(6, bool)
        awaiting[last.env_ids] = True
        assert (recvs - sends == awaiting).all()
        assert (~awaiting).sum() == env.num_envs - env.batch_size
        with pytest.raises(RuntimeError, match="async mode"):
            env.async_reset()  # others are still stepping


def test_pong_frames_stay_uint8_with_training_options():
    with make_env("Pong-v5", 1, kwargs={"episodic_life": True, "reward_clip": True}) as env:
        assert (env.spec.obs_shape, env.spec.obs_dtype) == ((4, 84, 84), np.uint8)
        assert env.spec.action_kind == "discrete" and env.spec.max_episode_steps == 27000
        env.async_reset()
        step = env.recv()
        for _ in range(3):
            env.send(np.ones(1, np.int64), step.env_ids)
            step = env.recv()
        assert step.obs.shape == (1, 4, 84, 84) and step.obs.dtype == np.uint8


def test_halfcheetah_continuous_float32():
    with make_env("HalfCheetah-v5", 2) as env:
        spec = env.spec
        assert (spec.action_kind, spec.num_actions, spec.action_shape) == ("continuous", 0, (6,))
        assert spec.action_low.dtype == np.float32 and (spec.action_low == -1).all()
        assert (spec.action_high == 1).all() and spec.max_episode_steps == 1000
        assert (spec.obs_shape, spec.obs_dtype) == ((17,), np.float32)
        env.async_reset()
        step = env.recv()
        for _ in range(3):
            env.send(np.full((2, 6), 0.5, np.float32), step.env_ids)
            step = env.recv()
        assert step.obs.shape == (2, 17) and step.obs.dtype == np.float32
        assert step.rewards.dtype == np.float32 and step.rewards.any()


def test_gymnasium_only_id_runs_through_truncation():
    assert "Taxi-v4" not in envpool.list_all_envs() and "Taxi-v4" in gymnasium.registry
    with make_env("Taxi-v4", 2, seed=3) as env:
        assert env.spec.max_episode_steps == 200 and env.spec.num_actions == 6
        recvs, _, ends, _ = drive(env, 230)  # drive checks the auto-reset step after the truncation
        assert (recvs == 231).all() and (ends[:, 1] == 1).all()


def test_env_fn_episode_ends_and_next_step_reset():
    with make_env("countdown", 2, env_fn=Countdown) as env:
        assert env.spec.action_kind == "continuous" and env.spec.max_episode_steps is None
        env.async_reset()
        flags = []
        for t in range(6):
            step = env.recv()
            assert step.obs.dtype == np.float32
            flags.append((step.rewards[0], bool(step.terminated[0]), bool(step.truncated[0])))
            env.send(np.zeros((2, 1), np.float32), step.env_ids)
        # reset, three steps (the last terminates), the auto-reset step, a new episode's first step
        assert flags == [(0, False, False), (1, False, False), (1, False, False), (1, True, False),
                         (0, False, False), (1, False, False)]


def test_unknown_id_suggests_close_ids_in_one_line():
    with pytest.raises(EnvError) as err:
        make_env("CartPol-v1", 1)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    assert message.startswith("unknown env id 'CartPol-v1'; did you mean: CartPole-v1")


@pytest.mark.parametrize(("args", "match"), [
    (dict(env_id="CartPole-v1", kwargs={"max_episode_step": 9}), "'max_episode_step'.*max_episode_steps"),
    (dict(env_id="CartPole-v1", kwargs={"max_episode_steps": "ten"}), "wrong type for max_episode_steps"),
    (dict(env_id="CartPole-v1", kwargs={"num_envs": 3}), "pass num_envs"),
    (dict(env_id="Taxi-v4", kwargs={"is_raining": True}), "is_raining"),
    (dict(env_id="Taxi-v4", batch_size=1), "needs an EnvPool env"),
    (dict(env_id="x", env_fn=Countdown, kwargs={"length": 2}), "inside env_fn"),
    (dict(env_id="CartPole-v1", num_envs=0), "num_envs must be at least 1"),
    (dict(env_id="CartPole-v1", batch_size=3), "batch_size must be between 1 and num_envs"),
])
def test_bad_arguments_raise_env_error(args, match):
    with pytest.raises(EnvError, match=match) as err:
        make_env(**{"num_envs": 2, **args})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make", [lambda: make_env("CartPole-v1", 2),
                                  lambda: make_env("countdown", 2, env_fn=Countdown)])
def test_calls_out_of_order_raise(make):
    env = make()
    with pytest.raises(RuntimeError, match="async_reset"):
        env.send(np.zeros(2, np.int64), np.arange(2))
    with pytest.raises(RuntimeError, match="async_reset"):
        env.recv()
    env.async_reset()
    with pytest.raises(RuntimeError, match="call recv"):
        env.send(np.zeros(2, np.int64), np.arange(2))
    step = env.recv()
    with pytest.raises(RuntimeError, match="call send"):
        env.recv()
    with pytest.raises(ValueError, match="differ"):
        env.send(np.zeros(2, np.int64), step.env_ids[::-1])
    env.send(np.zeros((2, *env.spec.action_shape), env.spec.action_dtype), step.env_ids)
    with pytest.raises(RuntimeError, match="call recv"):
        env.send(np.zeros(2, np.int64), step.env_ids)
    env.recv()
    env.async_reset()  # allowed again in sync mode once a batch was received
    env.recv()
    env.close()
    env.close()
    for call in (env.async_reset, env.recv, lambda: env.send(np.zeros(2), np.arange(2))):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_arecv_runs_in_a_worker_thread_and_close_joins_it():
    threads_before = threading.active_count()
    Countdown.threads.clear()
    env = make_env("slow", 1, env_fn=lambda: Countdown(delay=0.2))

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        env.async_reset()
        step = await env.arecv()
        with pytest.raises(RuntimeError, match="call send"):
            await env.arecv()
        env.send(np.zeros((1, 1), np.float32), step.env_ids)
        await env.arecv()  # the step sleeps 0.2 s while the loop keeps ticking
        ticker.cancel()
        return ticks

    assert asyncio.run(main()) >= 5
    assert Countdown.threads and threading.get_ident() not in Countdown.threads
    assert threading.active_count() == threads_before + 1
    env.close()
    assert threading.active_count() == threads_before


def test_list_env_ids():
    ids = list_env_ids()
    assert ids == sorted(set(ids))
    assert {"CartPole-v1", "Pong-v5", "HalfCheetah-v5", "Taxi-v4"} <= set(ids)
