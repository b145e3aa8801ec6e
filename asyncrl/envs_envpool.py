"""The EnvPool backend: EnvPool's C++ vector envs (sync mode, or async when ``batch_size`` is
below ``num_envs``) behind the :class:`VecEnv` contract, with ``kwargs`` checked against the env's
own config so a misspelt or mistyped option is one line, not pybind11's signature dump.

EnvPool itself is imported at first use (:func:`envpool_module`). ``asyncrl.envs.make_env`` picks
this backend for every id EnvPool ships.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncrl.core import EnvSpec
from asyncrl.envs_base import EnvError, Step, VecEnv, did_you_mean, make_step, spec_from_spaces


def envpool_module():
    """EnvPool, imported at first use: its import registers every env family it ships (~1.6 s
    here), which a command that fails on its arguments, or never makes an env, need not wait for."""
    import envpool

    return envpool


class EnvPoolVecEnv(VecEnv):
    """EnvPool's own vector env: it steps in EnvPool's C++ threads, and ``recv`` releases the GIL."""

    def __init__(self, env: Any, spec: EnvSpec, num_envs: int, batch_size: int) -> None:
        super().__init__(spec, num_envs, batch_size)
        self._env = env
        # What the C++ side takes (int32 for discrete, float64 for MuJoCo); EnvPool reads the last action key.
        self._action_dtype = list(env.spec.action_array_spec.values())[-1].dtype

    def _reset(self) -> None:
        self._env.async_reset()

    def _send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self._env.send(actions.astype(self._action_dtype, copy=False), env_ids.astype(np.int32))

    def _recv(self) -> Step:
        obs, rewards, terminated, truncated, info = self._env.recv()
        return make_step(obs, rewards, terminated, truncated, info["env_id"])

    def _close(self) -> None:
        self._env.close()


# Options envpool.make takes besides its config fields (see envpool.registration._extract_make_options).
_ENVPOOL_MAKE_OPTIONS = {"from_pixels", "render_mode", "render_env_id", "render_width", "render_height",
                         "render_camera_id"}


def make_envpool(env_id: str, num_envs: int, batch_size: int, seed: int, kwargs: dict[str, Any]) -> VecEnv:
    envpool = envpool_module()
    defaults = envpool.make_spec(env_id).config._asdict()
    known = sorted(defaults.keys() | _ENVPOOL_MAKE_OPTIONS)
    for key in kwargs:
        if key not in known:
            raise EnvError(f"unknown option {key!r} for {env_id}" + did_you_mean(key, known))
    try:
        env = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, batch_size=batch_size, seed=seed,
                           **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        # A wrong type surfaces as pybind11's many-line signature dump; name the key instead.
        wrong = [key for key, value in kwargs.items()
                 if key in defaults and not _same_kind(value, defaults[key])]
        detail = f"wrong type for {', '.join(wrong)}" if wrong else (str(err).splitlines() or [repr(err)])[0]
        raise EnvError(f"invalid kwargs for {env_id}: {detail}") from None
    try:
        spec = spec_from_spaces(env_id, env.observation_space, env.action_space,
                                getattr(env.spec.config, "max_episode_steps", None))
    except EnvError:
        env.close()
        raise
    return EnvPoolVecEnv(env, spec, num_envs, batch_size)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return default is None or isinstance(value, type(default))
