"""Vector environments: EnvPool (sync and async mode) and any Gymnasium env, behind one API.

:func:`make_env` is the one way to make envs: it checks the arguments, picks the backend
(``env_fn`` and ids only Gymnasium knows: ``envs_gymnasium.py``; EnvPool's ids:
``envs_envpool.py``) and can keep only some entries of a vector observation. This module also
holds the catalogue of env ids (:func:`list_env_ids`, :func:`env_families`) and re-exports the
contract every backend keeps (``envs_base.py``: calling order, "next step" auto-reset, ``arecv``),
so ``asyncrl.envs`` is the one import for users of envs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np

from asyncrl.envs_base import EnvError, Step, VecEnv, did_you_mean, spec_from_spaces
from asyncrl.envs_envpool import envpool_module, make_envpool
from asyncrl.envs_gymnasium import make_gymnasium

__all__ = ["EnvError", "Step", "VecEnv", "env_families", "list_env_ids", "make_env", "spec_from_spaces"]


# --- the catalogue of env ids -------------------------------------------------------------------


def list_env_ids() -> list[str]:
    """Every id ``make_env`` knows: EnvPool's and Gymnasium's."""
    return sorted(set(envpool_module().list_all_envs()) | set(gymnasium.registry))


def env_families() -> dict[str, list[str]]:
    """EnvPool's ids grouped by the module that implements them (atari, mujoco, classic_control...)."""
    families: dict[str, list[str]] = {}
    envpool = envpool_module()
    specs = getattr(getattr(envpool, "registration", None), "registry", None)
    specs = getattr(specs, "specs", {})
    for env_id in envpool.list_all_envs():
        entry = specs.get(env_id)
        family = entry[0].removeprefix("envpool.").replace(".", "/") if entry else "other"
        families.setdefault(family, []).append(env_id)
    return dict(sorted(families.items()))


# --- making envs ---------------------------------------------------------------------------------


def make_env(
    env_id: str,
    num_envs: int,
    batch_size: int | None = None,
    seed: int = 0,
    kwargs: dict[str, Any] | None = None,
    env_fn: Callable[[], gymnasium.Env] | None = None,
    max_errors_in_a_row: int = 3,
    obs_indices: list[int] | None = None,
) -> VecEnv:
    """``num_envs`` copies of ``env_id``: from ``env_fn`` if given, else EnvPool, else Gymnasium.

    ``batch_size`` below ``num_envs`` is EnvPool's async mode: each ``recv`` returns whichever
    ``batch_size`` envs are ready. ``kwargs`` go to ``envpool.make`` or ``gymnasium.make``.
    ``max_errors_in_a_row``: Gymnasium envs only (see ``envs_gymnasium.GymnasiumVecEnv``).
    ``obs_indices``: keep only these entries of a vector observation (e.g. CartPole's positions
    without its velocities, to make a partially observed task).
    """
    env = _make_env(env_id, num_envs, batch_size, seed, kwargs, env_fn, max_errors_in_a_row)
    if obs_indices is None:
        return env
    try:
        return _SelectObs(env, obs_indices)
    except EnvError:
        env.close()
        raise


def _make_env(env_id: str, num_envs: int, batch_size: int | None, seed: int, kwargs: dict[str, Any] | None,
              env_fn: Callable[[], gymnasium.Env] | None, max_errors_in_a_row: int) -> VecEnv:
    kwargs = dict(kwargs or {})
    if num_envs < 1:
        raise EnvError(f"num_envs must be at least 1, got {num_envs}")
    batch_size = num_envs if batch_size is None else batch_size
    if not 1 <= batch_size <= num_envs:
        raise EnvError(f"batch_size must be between 1 and num_envs ({num_envs}), got {batch_size}")
    if reserved := sorted({"num_envs", "batch_size", "seed", "env_type"} & kwargs.keys()):
        raise EnvError(f"pass {', '.join(reserved)} as arguments of make_env, not in kwargs")

    if env_fn is not None:
        if kwargs:
            raise EnvError("kwargs cannot be used with env_fn; pass them inside env_fn")
        return make_gymnasium(env_id, num_envs, batch_size, seed, env_fn, max_errors_in_a_row)
    if env_id in envpool_module().list_all_envs():
        with warnings.catch_warnings():
            # EnvPool declares float64 bounds on float32 boxes; gymnasium warns on every make.
            warnings.filterwarnings("ignore", message=".*precision lowered by casting", category=UserWarning)
            return make_envpool(env_id, num_envs, batch_size, seed, kwargs)
    if env_id in gymnasium.registry:
        def make_one() -> gymnasium.Env:
            return gymnasium.make(env_id, **kwargs)
        return make_gymnasium(env_id, num_envs, batch_size, seed, make_one, max_errors_in_a_row)
    hint = did_you_mean(env_id, list_env_ids(), otherwise="; see asyncrl.envs.list_env_ids()")
    raise EnvError(f"unknown env id {env_id!r}{hint}")


class _SelectObs(VecEnv):
    """Another VecEnv whose vector observations keep only the entries at ``indices``."""

    def __init__(self, env: VecEnv, indices: list[int]) -> None:
        shape = env.spec.obs_shape
        if len(shape) != 1:
            raise EnvError(f"env.obs_indices selects entries of a vector observation; "
                           f"{env.spec.env_id} observes shape {shape}")
        if not indices or any(not -shape[0] <= i < shape[0] for i in indices):
            raise EnvError(f"env.obs_indices {indices} must be a non-empty list of indices into "
                           f"{env.spec.env_id}'s {shape[0]} observation entries")
        spec = dataclasses.replace(env.spec, obs_shape=(len(indices),))
        super().__init__(spec, env.num_envs, env.batch_size)
        self._env, self._indices = env, np.asarray(indices, np.int64)

    def __getattr__(self, name: str) -> Any:  # the wrapped env's counters (errors, ...)
        env = self.__dict__.get("_env")
        if env is None:
            raise AttributeError(name)
        return getattr(env, name)

    def _reset(self) -> None:
        self._env._reset()

    def _send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self._env._send(actions, env_ids)

    def _recv(self) -> Step:
        step = self._env._recv()
        step.obs = np.ascontiguousarray(step.obs[:, self._indices])
        return step

    def _close(self) -> None:
        self._env.close()
