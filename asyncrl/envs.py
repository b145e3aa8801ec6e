"""Vector environments: EnvPool (sync and async mode) and any Gymnasium env, behind one API.

Every backend follows PufferLib's calling order: ``async_reset()``, then ``recv()`` and
``send(actions, env_ids)`` in turn, then ``close()``; anything out of order raises RuntimeError.
Auto-reset is "next step" everywhere: after an env reports terminated or truncated, its next
``recv`` ignores the action sent, returns the first observation of a new episode with reward 0 and
both flags False. That step is not a transition.

``arecv()`` runs the blocking ``recv`` in the env's own worker thread, so the event loop keeps
running while EnvPool's C++ threads step (its ``recv`` releases the GIL while it waits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from asyncrl.core import EnvSpec
from asyncrl.faults import RunError

log = logging.getLogger("asyncrl")

__all__ = ["EnvError", "Step", "VecEnv", "env_families", "list_env_ids", "make_env", "spec_from_spaces"]


def _envpool():
    """EnvPool, imported at first use: its import registers every env family it ships (~1.6 s
    here), which a command that fails on its arguments, or never makes an env, need not wait for."""
    import envpool

    return envpool


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


def list_env_ids() -> list[str]:
    """Every id ``make_env`` knows: EnvPool's and Gymnasium's."""
    return sorted(set(_envpool().list_all_envs()) | set(gymnasium.registry))


def env_families() -> dict[str, list[str]]:
    """EnvPool's ids grouped by the module that implements them (atari, mujoco, classic_control...)."""
    families: dict[str, list[str]] = {}
    envpool = _envpool()
    specs = getattr(getattr(envpool, "registration", None), "registry", None)
    specs = getattr(specs, "specs", {})
    for env_id in envpool.list_all_envs():
        entry = specs.get(env_id)
        family = entry[0].removeprefix("envpool.").replace(".", "/") if entry else "other"
        families.setdefault(family, []).append(env_id)
    return dict(sorted(families.items()))


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


def _make_step(obs: Any, rewards: Any, terminated: Any, truncated: Any, env_ids: Any) -> Step:
    obs = np.asarray(obs)
    return Step(
        obs=obs.astype(np.float32) if obs.dtype == np.float64 else obs,
        rewards=np.asarray(rewards, dtype=np.float32),
        terminated=np.asarray(terminated, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
        env_ids=np.asarray(env_ids, dtype=np.int64),
    )


class _EnvPoolVecEnv(VecEnv):
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
        return _make_step(obs, rewards, terminated, truncated, info["env_id"])

    def _close(self) -> None:
        self._env.close()


class _GymnasiumVecEnv(VecEnv):
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
        return _make_step(np.stack(obs), rewards, terminated, truncated, ids)

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
    ``max_errors_in_a_row``: Gymnasium envs only (see ``_GymnasiumVecEnv``).
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
        return _make_gymnasium(env_id, num_envs, batch_size, seed, env_fn, max_errors_in_a_row)
    if env_id in _envpool().list_all_envs():
        with warnings.catch_warnings():
            # EnvPool declares float64 bounds on float32 boxes; gymnasium warns on every make.
            warnings.filterwarnings("ignore", message=".*precision lowered by casting", category=UserWarning)
            return _make_envpool(env_id, num_envs, batch_size, seed, kwargs)
    if env_id in gymnasium.registry:
        def make_one() -> gymnasium.Env:
            return gymnasium.make(env_id, **kwargs)
        return _make_gymnasium(env_id, num_envs, batch_size, seed, make_one, max_errors_in_a_row)
    hint = _did_you_mean(env_id, list_env_ids(), otherwise="; see asyncrl.envs.list_env_ids()")
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


def _did_you_mean(name: str, known: list[str], otherwise: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean: {', '.join(close)}?" if close else otherwise


# Options envpool.make takes besides its config fields (see envpool.registration._extract_make_options).
_ENVPOOL_MAKE_OPTIONS = {"from_pixels", "render_mode", "render_env_id", "render_width", "render_height",
                         "render_camera_id"}


def _make_envpool(env_id: str, num_envs: int, batch_size: int, seed: int, kwargs: dict[str, Any]) -> VecEnv:
    envpool = _envpool()
    defaults = envpool.make_spec(env_id).config._asdict()
    known = sorted(defaults.keys() | _ENVPOOL_MAKE_OPTIONS)
    for key in kwargs:
        if key not in known:
            raise EnvError(f"unknown option {key!r} for {env_id}" + _did_you_mean(key, known))
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
    return _EnvPoolVecEnv(env, spec, num_envs, batch_size)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return default is None or isinstance(value, type(default))


def _make_gymnasium(env_id: str, num_envs: int, batch_size: int, seed: int,
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
    return _GymnasiumVecEnv(env, spec, seed, max_errors_in_a_row)
