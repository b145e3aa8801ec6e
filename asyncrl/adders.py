"""The adder interface (:class:`Adder`), and the n-step adder that turns the steps a vector env
returns into replay slots, one stream per env."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from asyncrl.replay import Replay

if TYPE_CHECKING:
    from asyncrl.acting import Acted


class Adder(Protocol):
    """What an actor's batches go into, one env stream each (n-step transitions, sequences or
    trajectories). Per batch, the insert handshake: reserve room under the gate for
    :meth:`pending` items, :meth:`observe` what the env returned, then :meth:`record_actions`
    for the actions sent back. Envs may come in any subset and order (EnvPool's async mode)."""

    def pending(self, env_ids) -> int:
        """How many items :meth:`observe` will insert for this batch."""
        ...

    def observe(self, env_ids, obs, rewards, terminated, truncated) -> int:
        """Take in what the envs returned; returns the number of items inserted."""
        ...

    def record_actions(self, env_ids, acted: Acted) -> None:
        """What the policy step chose at these envs' latest observations; each adder keeps the
        parts its data holds (the actions; the extras and weight version; the state)."""
        ...

    def reset(self) -> None:
        """Forget every env's partial data (the envs were reset)."""
        ...


class NStepAdder:
    """Pairs each env's previous observation and the action chosen at it with what the env
    returned next, and inserts that step into the env's replay stream (``streams_offset + env``).

    The replay computes n-step returns itself; the adder only has to hold one observation per env.
    EnvPool's reset step (the step after an episode end, whose action is ignored) goes in as a slot
    marked not applied: it holds the episode's final observation.

    Per batch: :meth:`observe` what the env returned, then :meth:`record_actions` for the actions
    sent back. Envs may come in any subset and order (EnvPool's async mode).
    """

    def __init__(self, replay: Replay, streams_offset: int, num_envs: int,
                 obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                 action_shape: tuple[int, ...], action_dtype: np.dtype):
        if streams_offset < 0 or streams_offset + num_envs > replay.num_streams:
            raise ValueError(
                f"envs {streams_offset}..{streams_offset + num_envs - 1} do not fit the replay's "
                f"{replay.num_streams} streams")
        self._replay = replay
        self._streams = streams_offset + np.arange(num_envs)
        self._prev_obs = np.zeros((num_envs, *obs_shape), obs_dtype)
        self._prev_actions = np.zeros((num_envs, *action_shape), action_dtype)
        self._prev_ended = np.zeros(num_envs, bool)  # the previous obs is an episode's last
        self._has_prev = np.zeros(num_envs, bool)
        self._has_action = np.zeros(num_envs, bool)

    def pending(self, env_ids) -> int:
        """How many slots :meth:`observe` will insert for this batch."""
        return int(np.count_nonzero(self._has_prev[np.asarray(env_ids, np.int64)]))

    def observe(self, env_ids, obs, rewards, terminated, truncated) -> int:
        """Take in what the envs returned; returns the number of slots inserted."""
        env_ids = np.asarray(env_ids, np.int64)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        has_prev = self._has_prev[env_ids]
        if np.any(has_prev & ~self._has_action[env_ids]):
            raise RuntimeError("observe() for an env whose previous observation got no action: "
                               "call record_actions() with the actions sent")
        # An env seen first since construction or reset() starts afresh: the last step in its
        # stream (from before a reset, or a previous run) will never get its successor.
        self._replay.cut(self._streams[env_ids[~has_prev]])
        ids = env_ids[has_prev]
        self._replay.insert(
            self._streams[ids], self._prev_obs[ids], self._prev_actions[ids],
            np.asarray(rewards)[has_prev], terminated[has_prev], truncated[has_prev],
            applied=~self._prev_ended[ids], **self._insert_extras(ids))
        self._prev_obs[env_ids] = obs
        self._prev_ended[env_ids] = terminated | truncated
        self._has_prev[env_ids] = True
        self._has_action[env_ids] = False
        return len(ids)

    def _insert_extras(self, ids: np.ndarray) -> dict:
        """What a subclass stores beside each step (keyword arguments of ``replay.insert``)."""
        return {}

    def record_actions(self, env_ids, acted: Acted) -> None:
        """The actions sent for these envs' latest observations."""
        env_ids = np.asarray(env_ids, np.int64)
        if not self._has_prev[env_ids].all():
            raise RuntimeError(
                "record_actions() for an env with no observation: call observe() first")
        self._prev_actions[env_ids] = acted.actions
        self._has_action[env_ids] = True

    def reset(self) -> None:
        """Forget every env's previous observation (call it when the envs are reset)."""
        self._has_prev[:] = False
        self._has_action[:] = False
