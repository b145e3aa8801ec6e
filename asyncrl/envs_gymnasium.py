"""The Gymnasium backend: any Gymnasium env (an id EnvPool lacks, or the user's own ``env_fn``)
behind the :class:`VecEnv` contract, stepped synchronously in the env's worker thread.

It is the backend for user code, so it is the one that survives an env raising: see
:class:`GymnasiumVecEnv`. ``asyncrl.envs.make_env`` picks it for ``env_fn`` and for ids only
Gymnasium knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from asyncrl.core import EnvSpec
from asyncrl.envs_base import EnvError, Step, VecEnv, make_step, spec_from_spaces
from asyncrl.faults import RunError

log = logging.getLogger("asyncrl")


class GymnasiumVecEnv(VecEnv):
    """Synchronous: ``send`` stores the actions and ``recv`` steps every env, so the work
    happens where ``arecv`` moves it off the event loop.

    The envs are stepped one by one (not through ``SyncVectorEnv.step``) so that one env whose
    ``step`` or ``reset`` raises costs that env's episode, not the run: its step is reported as a
    truncation at its last good observation with reward 0 (one made-up transition, so that the
    adders need not know), it is reset at its next step like any ended episode, and the error is
    counted in ``errors`` and logged with the env id. More than ``max_errors_in_a_row`` failures
    of one env without a good step between them (resets aside) raise :class:`RunError`."""

    def __init__(self, env: SyncVectorEnv, spec: EnvSpec, seed: int, max_errors_in_a_row: int) -> None:
        super().__init__(spec, env.num_envs, env.num_envs)
        self._env = env
        self._seed: int | None = seed
        self._needs_reset = True
        self._actions = np.empty(0)
        self.max_errors_in_a_row = max_errors_in_a_row
        self.errors = 0
        self._in_a_row = np.zeros(self.num_envs, np.int64)
        self._ended = np.ones(self.num_envs, bool)  # reset at the next step
        self._last_obs: list[Any] = [None] * self.num_envs

    def _reset(self) -> None:
        self._needs_reset = True

    def _send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self._actions = actions.astype(self._env.action_space.dtype, copy=False)

    def _recv(self) -> Step:
        n = self.num_envs
        ids = np.arange(n)
        rewards = np.zeros(n, np.float64)
        terminated, truncated = np.zeros(n, bool), np.zeros(n, bool)
        first = self._needs_reset
        if first:
            self._needs_reset = False
            self._ended[:] = True
        obs = []
        for i, env in enumerate(self._env.envs):
            stepping = not self._ended[i]
            try:
                if stepping:
                    o, rewards[i], terminated[i], truncated[i], _ = env.step(self._actions[i])
                else:
                    # Seeded once, like EnvPool whose seed is fixed at creation; env i gets seed + i.
                    seed = None if self._seed is None else self._seed + i
                    o, _ = env.reset(seed=seed)
            except Exception as exc:  # noqa: BLE001 - any failure of user code in an env
                self._failed(i, exc)
                o, truncated[i] = self._last_obs[i], True
                if o is None:  # failed before its first observation: nothing to show but zeros
                    o = np.zeros(self.spec.obs_shape, self.spec.obs_dtype)
            else:
                if stepping:  # a reset that works does not end a streak of failing steps
                    self._in_a_row[i] = 0
            self._ended[i] = terminated[i] or truncated[i]
            self._last_obs[i] = o
            obs.append(o)
        if first:
            self._seed = None
        return make_step(np.stack(obs), rewards, terminated, truncated, ids)

    def _failed(self, index: int, exc: Exception) -> None:
        self.errors += 1
        self._in_a_row[index] += 1
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if self._in_a_row[index] > self.max_errors_in_a_row:
            raise RunError(f"env {self.spec.env_id} #{index} failed {self._in_a_row[index]} times in a "
                           f"row (env.max_errors_in_a_row = {self.max_errors_in_a_row}); last error: "
                           f"{reason}") from None
        log.warning("env %s #%d raised %s; resetting it (%d in a row, %d in all)", self.spec.env_id,
                    index, reason, self._in_a_row[index], self.errors)

    def _close(self) -> None:
        self._env.close()


def make_gymnasium(env_id: str, num_envs: int, batch_size: int, seed: int,
                    env_fn: Callable[[], gymnasium.Env], max_errors_in_a_row: int = 3) -> VecEnv:
    if batch_size != num_envs:
        raise EnvError(f"batch_size < num_envs (async mode) needs an EnvPool env; "
                       f"{env_id} steps all its envs together")
    try:
        # NEXT_STEP is Gymnasium 1.x's default; named here because EnvPool and the adders rely on it.
        env = SyncVectorEnv([env_fn] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
    except (TypeError, gymnasium.error.Error) as err:
        raise EnvError(f"cannot make {env_id}: {(str(err).splitlines() or [repr(err)])[0]}") from None
    first = env.envs[0]
    try:
        spec = spec_from_spaces(env_id, env.single_observation_space, env.single_action_space,
                                first.spec.max_episode_steps if first.spec is not None else None)
    except EnvError:
        env.close()
        raise
    return GymnasiumVecEnv(env, spec, seed, max_errors_in_a_row)
