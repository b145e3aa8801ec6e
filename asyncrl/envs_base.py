"""The vector-env contract every backend follows, and what backends share to keep it.

Every backend follows PufferLib's calling order: ``async_reset()``, then ``recv()`` and
``send(actions, env_ids)`` in turn, then ``close()``; anything out of order raises RuntimeError.
Auto-reset is "next step" everywhere: after an env reports terminated or truncated, its next
``recv`` ignores the action sent, returns the first observation of a new episode with reward 0 and
both flags False. That step is not a transition.

``arecv()`` runs the blocking ``recv`` in the env's own worker thread, so the event loop keeps
running while EnvPool's C++ threads step (its ``recv`` releases the GIL while it waits).

:class:`VecEnv` checks the calling order once, for every backend; a backend (``envs_envpool.py``,
``envs_gymnasium.py``) implements only ``_reset``, ``_send``, ``_recv`` and ``_close``, and builds
its :class:`EnvSpec` and its :class:`Step` batches with :func:`spec_from_spaces` and
:func:`make_step`, so all backends read the same spaces and hand out the same dtypes. Import the
public names from ``asyncrl.envs``, which re-exports them.
"""

from __future__ import annotations

import asyncio
import difflib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from asyncrl.core import EnvSpec


class EnvError(ValueError):
    """An environment that cannot be made as asked; the message is one line for the user."""


@dataclass
class Step:
    """One batch from ``recv``: row i belongs to env ``env_ids[i]``."""

    obs: np.ndarray  # float64 observations arrive as float32; uint8 frames stay uint8
    rewards: np.ndarray  # float32
    terminated: np.ndarray  # bool: the episode ended; do not bootstrap
    truncated: np.ndarray  # bool: cut by a time limit; bootstrap from obs
    env_ids: np.ndarray  # int64


def spec_from_spaces(
    env_id: str,
    obs_space: gymnasium.Space,
    act_space: gymnasium.Space,
    max_episode_steps: int | None = None,
) -> EnvSpec:
    """The :class:`EnvSpec` of an env with these single-env spaces."""
    if not isinstance(obs_space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary):
        raise EnvError(f"{env_id}: observation space {obs_space} is unsupported (use e.g. Box)")
    obs_dtype = np.dtype(np.float32) if obs_space.dtype == np.float64 else np.dtype(obs_space.dtype)
    common = dict(env_id=env_id, obs_shape=tuple(obs_space.shape), obs_dtype=obs_dtype,
                  max_episode_steps=max_episode_steps)
    if isinstance(act_space, spaces.Discrete):
        if act_space.start != 0:  # algorithms emit actions 0..n-1
            raise EnvError(f"{env_id}: Discrete action spaces starting at {act_space.start} are unsupported")
        return EnvSpec(**common, action_kind="discrete", num_actions=int(act_space.n), action_shape=())
    if isinstance(act_space, spaces.Box):
        return EnvSpec(**common, action_kind="continuous", num_actions=0, action_shape=tuple(act_space.shape),
                       action_low=act_space.low.astype(np.float32),
                       action_high=act_space.high.astype(np.float32))
    raise EnvError(f"{env_id}: action space {act_space} is unsupported (use Discrete or Box)")


_NEEDS_RESET, _NEEDS_RECV, _RECEIVING, _NEEDS_SEND, _CLOSED = (
    "call async_reset() first", "call recv() first", "a recv() is still running", "call send() first",
    "the env is closed",
)


class VecEnv:
    """``num_envs`` environments stepped in batches of ``batch_size``; see the module docstring."""

    def __init__(self, spec: EnvSpec, num_envs: int, batch_size: int) -> None:
        self.spec = spec
        self.num_envs = num_envs
        self.batch_size = batch_size
        self._state = _NEEDS_RESET
        self._last_env_ids = np.empty(0, dtype=np.int64)
        self._executor: ThreadPoolExecutor | None = None

    def async_reset(self) -> None:
        """Reset every env; the next ``recv`` returns first observations."""
        # In async mode some envs are still stepping after a recv; resetting under them is undefined.
        in_flight = self.batch_size < self.num_envs and self._state is _NEEDS_SEND
        if self._state not in (_NEEDS_RESET, _NEEDS_SEND) or in_flight:
            raise RuntimeError(f"async_reset() out of order: {self._state}"
                               + ("; in async mode make a new env to start over" if in_flight else ""))
        self._reset()
        self._state = _NEEDS_RECV

    def send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        """Actions (int64 discrete, float32 continuous) for the envs of the last ``recv``, in its order."""
        self._expect(_NEEDS_SEND, "send")
        actions, env_ids = np.asarray(actions), np.asarray(env_ids)
        if not np.array_equal(env_ids, self._last_env_ids):
            raise ValueError(f"send(): env_ids {env_ids} differ from the last recv()'s {self._last_env_ids}")
        if len(actions) != len(env_ids):
            raise ValueError(f"send(): {len(actions)} actions for {len(env_ids)} env_ids")
        self._send(actions, env_ids)
        self._state = _NEEDS_RECV

    def recv(self) -> Step:
        """The next ``batch_size`` envs to finish their step (blocks until they have)."""
        self._expect(_NEEDS_RECV, "recv")
        self._state = _RECEIVING
        return self._finish_recv()

    async def arecv(self) -> Step:
        """``recv`` in this env's worker thread, leaving the event loop free.

        Cancelling it loses the batch being received: close the env afterwards."""
        self._expect(_NEEDS_RECV, "arecv")
        self._state = _RECEIVING
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncrl-env")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._finish_recv)

    def close(self) -> None:
        """Close the envs and join the worker thread; calling it again does nothing."""
        if self._state is _CLOSED:
            return
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # lets a running recv finish before the env goes away
        self._state = _CLOSED
        self._close()

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _expect(self, state: str, call: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"{call}() out of order: {self._state}")

    def _finish_recv(self) -> Step:
        try:
            step = self._recv()
        except BaseException:
            self._state = _NEEDS_RECV
            raise
        self._last_env_ids = step.env_ids
        self._state = _NEEDS_SEND
        return step

    # What a backend implements; the public methods above have checked the calling order.
    def _reset(self) -> None:
        raise NotImplementedError

    def _send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        raise NotImplementedError

    def _recv(self) -> Step:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def make_step(obs: Any, rewards: Any, terminated: Any, truncated: Any, env_ids: Any) -> Step:
    """A backend's batch as a :class:`Step`: float64 observations as float32, the dtypes fixed."""
    obs = np.asarray(obs)
    return Step(
        obs=obs.astype(np.float32) if obs.dtype == np.float64 else obs,
        rewards=np.asarray(rewards, dtype=np.float32),
        terminated=np.asarray(terminated, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
        env_ids=np.asarray(env_ids, dtype=np.int64),
    )


def did_you_mean(name: str, known: list[str], otherwise: str = "") -> str:
    """The hint an error about an unknown ``name`` ends with: up to three close ``known`` ones."""
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean: {', '.join(close)}?" if close else otherwise
