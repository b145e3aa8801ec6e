"""Learning from a dataset alone (``replay.dataset``): the data plan of an offline run.

The dataset (a local Minari dataset, :mod:`asyncrl.datasets`) is written once into the same
replay an online run fills, through the same adder, as if one env had played its episodes one
after another; the learner draws n-step transitions from it as it would online. No actor acts:
an :class:`UpdateClock` stands in for them, and since there are no env steps, an offline run
counts its updates as its steps (``train.total_env_steps``, ``eval_every``, ``checkpoint_every``
and ``log_every`` count updates; its metric rows' ``env_steps`` is the update count). The gate is
always open (:class:`OpenGate`): nothing is inserted while learning. The dataset is read again
on resume, so checkpoints never carry it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from asyncrl.acting import Acted
from asyncrl.actor import ActorBase
from asyncrl.adders import NStepAdder
from asyncrl.config import Config, ConfigError, require_memory
from asyncrl.core import Algorithm, SequenceData, TransitionData, actor_state_spec
from asyncrl.datasets import Episode, read_episodes
from asyncrl.draws import ReplayDraw
from asyncrl.ratelimit import LimiterStopped
from asyncrl.replay import Replay
from asyncrl.sequence import SequenceAdder, SequenceReplay
from asyncrl.staging import Staging

# Longest the clock waits for the learner to come back for a draw before it looks anyway (a
# stop). It ticks once per chunk: a tick every 2 ms took the GIL from the learner's thread 500
# times a second, and the run lost ~8% of its updates to it (BENCHMARKS.md, Offline RL).
_CLOCK_PERIOD_S = 0.05


class OpenGate:
    """The gate of a store that nothing inserts into while learning: every draw is allowed
    until :meth:`stop`; in serial mode, as many as :meth:`allow` granted (one per tick of the
    clock, or the serial loop would draw for ever). ``drawn`` is set as the learner comes for
    its next chunk's draw (its last chunk is counted then): the clock's cue."""

    def __init__(self) -> None:
        self.stopped = False
        self.samples = 0
        self._allowed: int | None = None  # None: every draw
        self.drawn = asyncio.Event()

    def allow(self, batches: int) -> None:
        self._allowed = (self._allowed or 0) + batches

    async def await_sample(self, n: int) -> None:
        self.drawn.set()
        if not self.try_sample(n):
            raise LimiterStopped

    def try_sample(self, n: int | None = None) -> bool:
        if self.stopped or self._allowed == 0:
            return False
        if self._allowed is not None:
            self._allowed -= 1
        self.samples += n or 0
        return True

    def stop(self) -> None:
        self.stopped = True

    def stats(self) -> dict[str, float]:
        return {"inserts": 0, "samples": self.samples, "insert_wait_s": 0.0, "sample_wait_s": 0.0}


class UpdateClock(ActorBase):
    """An offline run's stand-in for its actors: it acts in no env, and moves the run's step
    count with the learner's updates, so that the trainer's schedule (evaluations, checkpoints,
    logging, the end) runs on updates."""

    def __init__(self, store: Any, recorder: Any) -> None:
        super().__init__(0, store, None, recorder)

    def _tick(self) -> None:
        self.recorder.env_steps = self.recorder.updates
        self.weight_version = self.store.version  # the learner's weights are the ones evaluated

    async def run(self, limiter: Any, on_steps) -> None:
        try:
            while not limiter.stopped:
                try:
                    await asyncio.wait_for(limiter.drawn.wait(), _CLOCK_PERIOD_S)
                except TimeoutError:
                    pass
                limiter.drawn.clear()
                self._tick()
                if on_steps():
                    return
        except LimiterStopped:
            return

    def step_now(self, limiter: OpenGate, learn) -> None:
        """Serial mode: one update, then the count."""
        limiter.allow(1)
        learn()
        self._tick()

    def reset_envs(self) -> None:
        pass

    def rng_state(self) -> dict:
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def fill(replay: Replay | SequenceReplay, episodes: list[Episode], adder: NStepAdder,
         state: dict[str, np.ndarray] | None = None) -> None:
    """Every episode into ``adder``'s stream, as EnvPool would have returned them: each
    episode's first observation (a reset step, reward 0), then its steps; the action sent with a
    final observation is not taken (the next step resets). ``state``: the actor state stored with
    every step of a sequence replay (a dataset holds none: zeros, which R2D2's burn-in makes up
    for, the R2D2 paper's "zero state" strategy)."""
    env0, zero, no = np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros(1, bool)
    state = state or {}
    for episode in episodes:
        obs, actions = episode.observations, episode.actions
        adder.observe(env0, obs[:1], zero, no, no)
        for t in range(len(actions)):
            adder.record_actions(env0, Acted(actions[t:t + 1], {}, state, 0))
            adder.observe(env0, obs[t + 1:t + 2], episode.rewards[t:t + 1].astype(np.float32),
                          episode.terminations[t:t + 1], episode.truncations[t:t + 1])
        adder.record_actions(env0, Acted(np.zeros_like(actions[:1]), {}, state, 0))  # not taken
    # The last final observation goes in as the next reset step arrives: one that never comes
    # but for this (its own row has no successor, so it is never drawn).
    adder.observe(env0, episodes[0].observations[:1], zero, no, no)
    adder.record_actions(env0, Acted(np.zeros_like(episodes[0].actions[:1]), {}, state, 0))


class OfflinePlan:
    """n-step transitions (the algorithm's own n-step and discount) or sequences (its length and
    period, zero actor states) drawn from a dataset."""

    def place(self, config: Config, algo: Algorithm, where: str) -> str:
        if not isinstance(algo.data, (TransitionData, SequenceData)):
            raise ConfigError(f"{config.algo.name} learns from {type(algo.data).__name__}, each used once as "
                              "it is acted; replay.dataset serves n-step transitions (DQN, SAC, TD3, BC, CQL) "
                              "and sequences (R2D2)")
        return "none"

    def make(self, s: Any) -> Any:
        from asyncrl.plans import Data

        config, r, batch = s.config, s.config.replay, s.config.learner.batch_size
        replay = dataset_replay(s, config.replay.dataset, config.train.seed)
        beta = r.importance_exponent if r.prioritized else 0.0
        # Uniform transitions: the draw gathers from returns built once. Priorities change
        # what is drawn, and sequences are drawn as the replay draws them.
        source = (FrozenTransitions(replay, config.train.seed)
                  if isinstance(replay, Replay) and not replay.prioritized else replay)
        draw = ReplayDraw(source, batch, lambda: beta, Staging(s.device), s.recorder.timer)
        return Data(replay, OpenGate(), draw, _no_adder, batch, config.learner.publish_every,
                    actor_cls=UpdateClock)


class FrozenTransitions:
    """A uniform draw from a replay that nothing writes into any more (an offline run's dataset):
    every transition's n-step return, discount and next observation's slot are built once, so a
    draw only picks items and gathers them. A replay draw of 256 transitions builds its returns
    from the rings each time, ~100 us of numpy calls; this one ~20 us (BENCHMARKS.md, Offline RL).
    It draws what :meth:`Replay.sample` draws (uniformly among the sampleable slots), from its
    own generator."""

    prioritized = False

    def __init__(self, replay: Replay, seed: int | list[int]):
        self.replay = replay
        self._leaves = np.flatnonzero(replay.state_dict()["priorities"] > 0)  # the sampleable slots
        returns = replay.n_step_returns(self._leaves)
        self._rewards, self._discounts = returns["rewards"], returns["discounts"]
        self._next_leaves, self._keys = returns["next_leaves"], returns["keys"]
        self._obs = replay.obs.reshape(-1, *replay.obs.shape[2:])
        self._actions = replay.actions.reshape(-1, *replay.actions.shape[2:])
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size: int, importance_exponent: float = 0.0, batches: int = 1) -> dict[str, np.ndarray]:
        # int32 draws cost half of int64 ones, and take() a tenth of indexing rows with [].
        items = self._rng.integers(0, len(self._leaves), size=batch_size * batches, dtype=np.int32)
        leaves = self._leaves.take(items)
        return {"obs": self._obs.take(leaves, axis=0), "actions": self._actions.take(leaves, axis=0),
                "rewards": self._rewards.take(items), "discounts": self._discounts.take(items),
                "next_obs": self._obs.take(self._next_leaves.take(items), axis=0),
                "weights": np.ones(len(items), np.float32), "keys": self._keys.take(items)}

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        pass  # uniform


def dataset_replay(s: Any, dataset_id: str, seed: int | list[int]) -> Replay | SequenceReplay:
    """A replay holding every episode of a local Minari dataset (checked against the run's env),
    in the run's dtypes, n-step and discount (or sequence length and period, with zero actor
    states); prioritised as ``replay.prioritized`` says. It lives in this process only: an
    offline run's learner and an online run's demonstrations (:class:`~asyncrl.draws.MixedDraw`)
    read it, and no actor writes it."""
    config, spec, data = s.config, s.spec, s.algo.data
    r = config.replay
    episodes = read_episodes(dataset_id, spec)
    rows = sum(len(ep.actions) + 1 for ep in episodes) + 1
    step_bytes = 32 + episodes[0].observations[0].nbytes + max(1, episodes[0].actions[:1].nbytes)
    require_memory("replay.dataset" if dataset_id == r.dataset else "replay.demonstrations",
                   f"a replay of dataset {dataset_id} ({rows} steps)", rows * step_bytes)
    alpha = r.priority_exponent if r.prioritized else 0.0
    # Room for every row and the n-step or sequence look-ahead: a ring that never wraps.
    if isinstance(data, SequenceData):
        replay = SequenceReplay(max(rows + data.length + 16, 2 * data.length), 1, spec.obs_shape, spec.obs_dtype,
                                spec.action_shape, spec.action_dtype, data.length, data.period,
                                actor_state_spec(s.algo) or {}, priority_exponent=alpha, seed=seed)
    else:
        replay = Replay(rows + data.n_step + 16, 1, spec.obs_shape, spec.obs_dtype, spec.action_shape,
                        spec.action_dtype, data.n_step, data.gamma, priority_exponent=alpha, seed=seed)
    _write(s, replay, 0, episodes)
    return replay


def _write(s: Any, replay: Replay | SequenceReplay, stream: int, episodes: list[Episode]) -> None:
    """``episodes`` into one stream of ``replay`` through the adder its kind of data takes (a
    sequence replay's with zero actor states: a dataset holds none)."""
    spec = s.spec
    shapes = dict(obs_shape=spec.obs_shape, obs_dtype=spec.obs_dtype, action_shape=spec.action_shape,
                  action_dtype=spec.action_dtype)
    episodes = [_as(spec, ep) for ep in episodes]
    if isinstance(replay, SequenceReplay):
        states = actor_state_spec(s.algo) or {}
        adder = SequenceAdder(replay, streams_offset=stream, num_envs=1, state_spec=states, **shapes)
        fill(replay, episodes, adder, {name: np.zeros((1, *shape), dtype) for name, (shape, dtype) in states.items()})
    else:
        fill(replay, episodes, NStepAdder(replay, streams_offset=stream, num_envs=1, **shapes))


def prefill(s: Any, replay: Replay | SequenceReplay, episodes: list[Episode]) -> int:
    """Write ``episodes`` (read for ``replay.prefill``) into an online run's ``replay`` before any
    actor acts, spread round-robin over its streams through the same adder; the rows written.
    Each stream ends at an unapplied final observation, so no return runs into the actors' steps."""
    for stream in range(min(replay.num_streams, len(episodes))):
        _write(s, replay, stream, episodes[stream::replay.num_streams])
    return sum(len(ep.actions) + 1 for ep in episodes)


def _no_adder(i: int) -> None:
    raise RuntimeError("an offline run has no actors to write")


def _as(spec: Any, episode: Episode) -> Episode:
    """An episode in the run's dtypes (a dataset of float64 observations, int32 actions)."""
    return Episode(episode.observations.astype(spec.obs_dtype, copy=False),
                   episode.actions.astype(spec.action_dtype, copy=False).reshape(-1, *spec.action_shape),
                   episode.rewards, episode.terminations, episode.truncations)
