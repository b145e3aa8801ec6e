"""Offline datasets in Farama's Minari format (the successor of D4RL, read by d3rlpy and TorchRL):
a run's policy played into whole episodes (:func:`record`, ``python -m asyncrl record``), written
where Minari keeps datasets (``MINARI_DATASETS_PATH``), and read back as whole episodes
(:func:`read_episodes`), checked against the env they claim to come from.

Minari is optional (``pip install 'asyncrl[offline]'``): it is imported here only, when a dataset
is used, and its absence is one line. Episodes are written whole with
``minari.create_dataset_from_buffers``, which needs none of the ``DataCollector``'s extras (jax).
Reading goes through ``minari.load_dataset``: HDF5 data, never pickled code."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from asyncrl.acting import PolicyStep
from asyncrl.core import EnvSpec
from asyncrl.envs import VecEnv

# namespace/name-vN or name-vN, as Minari parses them (e.g. cartpole/expert-v0): letters, digits,
# "_" and "-" only (Minari makes a dataset's folder before it refuses a dot, and then lists none)
_DATASET_ID = re.compile(r"^(?:[-\w][-\w/]*[-\w]/)?[-\w]+-v\d+$")


class DatasetError(Exception):
    """A dataset that cannot be written or read as asked: one line, naming it."""


@dataclass
class Episode:
    """One whole episode: ``observations`` has one more row than the rest (the final one)."""

    observations: np.ndarray  # [T + 1, *obs_shape]
    actions: np.ndarray  # [T, *action_shape]
    rewards: np.ndarray  # [T] float64
    terminations: np.ndarray  # [T] bool
    truncations: np.ndarray  # [T] bool

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


def minari():
    """The ``minari`` module, or one line saying how to install it."""
    try:
        import minari as module
    except ImportError:
        raise DatasetError("datasets need Minari, which is not installed: "
                           "pip install 'asyncrl[offline]' (or minari[hdf5] and pillow)") from None
    return module


def check_id(dataset_id: str) -> str:
    if not _DATASET_ID.match(dataset_id):
        raise DatasetError(f"dataset id {dataset_id!r} is not a Minari id: name-vN or "
                           "namespace/name-vN, e.g. cartpole/expert-v0")
    return dataset_id


def noisy(spec: EnvSpec, epsilon: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Exploration on top of greedy actions, for datasets of lesser quality: discrete actions are
    replaced by uniform ones with probability ``epsilon``; continuous ones get Gaussian noise of
    standard deviation ``epsilon`` times half the action range, clipped to the range."""
    if spec.action_kind == "discrete":
        def explore(actions: np.ndarray) -> np.ndarray:
            swap = rng.random(len(actions)) < epsilon
            return np.where(swap, rng.integers(spec.num_actions, size=len(actions)), actions)
    else:
        low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)

        def explore(actions: np.ndarray) -> np.ndarray:
            noise = rng.standard_normal(actions.shape) * epsilon * (high - low) / 2
            return np.clip(actions + noise, low, high).astype(actions.dtype)
    return explore if epsilon > 0 else (lambda actions: actions)


def play(env: VecEnv, policy: PolicyStep, episodes: int, explore: Callable[[np.ndarray], np.ndarray],
         on_episode: Callable[[Episode], None] = lambda episode: None) -> list[Episode]:
    """``episodes`` whole episodes of ``policy`` on ``env`` (a sync or async pool), in the order they
    ended. EnvPool resets an env in the step after its episode's last: that step's observation
    starts the next episode, and the action sent with a last observation is not taken."""
    n = env.num_envs
    obs: list[list[np.ndarray]] = [[] for _ in range(n)]
    acts: list[list[np.ndarray]] = [[] for _ in range(n)]
    rews: list[list[float]] = [[] for _ in range(n)]
    ends: list[list[tuple[bool, bool]]] = [[] for _ in range(n)]
    started = np.zeros(n, bool)  # the env's current episode has its first observation
    done: list[Episode] = []
    env.async_reset()
    while len(done) < episodes:
        step = env.recv()
        ids = step.env_ids
        for row, e in enumerate(ids.tolist()):
            if not started[e]:  # a reset step: the first observation of an episode
                obs[e], acts[e], rews[e], ends[e] = [step.obs[row].copy()], [], [], []
                started[e] = True
                continue
            obs[e].append(step.obs[row].copy())
            rews[e].append(float(step.rewards[row]))
            ends[e].append((bool(step.terminated[row]), bool(step.truncated[row])))
            if step.terminated[row] or step.truncated[row]:
                flags = np.array(ends[e], bool).reshape(-1, 2)
                episode = Episode(np.stack(obs[e]), np.stack(acts[e]), np.array(rews[e]),
                                  flags[:, 0], flags[:, 1])
                started[e] = False
                if len(done) < episodes:
                    done.append(episode)
                    on_episode(episode)
        actions = explore(policy.act(step.obs, ids, 0, step.terminated, step.truncated).actions)
        for row, e in enumerate(ids.tolist()):
            if started[e]:
                acts[e].append(np.array(actions[row]))
        env.send(actions, ids)
    return done


def spaces(spec: EnvSpec) -> tuple[Any, Any]:
    """Gymnasium's observation and action spaces of ``spec``."""
    from gymnasium import spaces as gs

    if np.issubdtype(spec.obs_dtype, np.integer):
        info = np.iinfo(spec.obs_dtype)
        observation = gs.Box(info.min, info.max, spec.obs_shape, spec.obs_dtype)
    else:
        observation = gs.Box(-np.inf, np.inf, spec.obs_shape, spec.obs_dtype)
    if spec.action_kind == "discrete":
        action = gs.Discrete(spec.num_actions)
    else:
        action = gs.Box(np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32),
                        spec.action_shape, np.float32)
    return observation, action


def require_new(dataset_id: str) -> None:
    """One line unless ``dataset_id`` is a valid id that no local dataset has (nothing is ever
    overwritten)."""
    m = minari()
    check_id(dataset_id)
    if dataset_id in m.list_local_datasets():
        raise DatasetError(f"dataset {dataset_id} exists already (minari show {dataset_id}): choose "
                           f"another id, or delete it first (minari delete {dataset_id})")


def write(dataset_id: str, episodes: list[Episode], spec: EnvSpec, algorithm: str,
          metadata: dict[str, Any]) -> Any:
    """A new local Minari dataset of ``episodes`` (see :func:`require_new`). ``metadata`` goes into
    the dataset's metadata beside Minari's own, its keys prefixed ``asyncrl/``."""
    m = minari()
    require_new(dataset_id)
    if not episodes:
        raise DatasetError(f"no episode to write into {dataset_id}")
    from minari.data_collector.episode_buffer import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, observations=list(ep.observations), actions=list(ep.actions),
                             rewards=ep.rewards.tolist(), terminations=ep.terminations.tolist(),
                             truncations=ep.truncations.tolist()) for i, ep in enumerate(episodes)]
    observation_space, action_space = spaces(spec)
    with warnings.catch_warnings():  # Minari's advice on an author's e-mail and an eval env
        warnings.filterwarnings("ignore", message=".* is set to None", category=UserWarning)
        dataset = m.create_dataset_from_buffers(
            dataset_id, buffers, env=_gymnasium_id(spec.env_id), algorithm_name=algorithm,
            author="asyncrl", observation_space=observation_space, action_space=action_space,
            data_format="hdf5", description=f"recorded by asyncrl from a {algorithm} policy on {spec.env_id}")
    dataset.storage.update_metadata({f"asyncrl/{k}": v for k, v in metadata.items()})
    return dataset


def whole_episodes(store: Any) -> list[Episode]:
    """Every whole episode a ring store of env streams still holds (a :class:`~asyncrl.replay.Replay`, or a
    :class:`~asyncrl.sequence.SequenceReplay`: the same rings), stream by stream in the order played.
    An episode is a run of applied steps after an unapplied one (or from a stream's first
    step) that ends in a terminated or truncated step, whose final observation is the next
    slot's (EnvPool's reset step). Partial ones are left out: the oldest, when its first steps
    were overwritten, the newest, still running, and any cut short (a reset or a resume)."""
    found: list[Episode] = []
    capacity = store.stream_capacity
    for s in range(store.num_streams):
        head = int(store.head[s])
        positions = np.arange(max(0, head - capacity), head)
        positions = positions[store.positions[s, positions % capacity] == positions]
        if len(positions) == 0:
            continue
        cols = positions % capacity
        applied = store.applied[s, cols]
        ends = store.terminated[s, cols] | store.truncated[s, cols]
        before = np.concatenate([[positions[0] != 0], applied[:-1]])  # unknown before the oldest
        for start in np.flatnonzero(applied & ~before):
            rest = applied[start:]
            stop = start + (int(np.argmin(rest)) if not rest.all() else len(rest))  # first unapplied
            if stop >= len(applied) or not ends[stop - 1]:
                continue  # still running, or cut short
            steps, obs_cols = cols[start:stop], cols[start:stop + 1]
            found.append(Episode(store.obs[s, obs_cols].copy(), store.actions[s, steps].copy(),
                                 store.rewards[s, steps].astype(np.float64), store.terminated[s, steps].copy(),
                                 store.truncated[s, steps].copy()))
    return found


def check_recordable(dataset_id: str, store: Any, run_dir: str) -> None:
    """Before a run that keeps its episodes (``train.record_dataset``): one line unless its store
    is a replay (of transitions or sequences) and ``dataset_id`` is new, or was written by this same run when
    it stopped before (a resumed run's end then replaces it)."""
    from asyncrl.replay import Replay
    from asyncrl.sequence import SequenceReplay

    if not isinstance(store, (Replay, SequenceReplay)):
        raise DatasetError(f"train.record_dataset keeps the episodes a replay holds; this run's data is a "
                           f"{type(store).__name__}, each trajectory used once (DQN, SAC, TD3, R2D2 and their "
                           "kin record)")
    if _written_by(dataset_id, run_dir):
        return
    require_new(dataset_id)


def record_replay(dataset_id: str, store: Any, spec: EnvSpec, algorithm: str, run_dir: str) -> dict[str, float]:
    """Write the whole episodes ``store`` (a replay of transitions or sequences) holds into a new
    dataset (or replace the one this run wrote before it was resumed); their summary."""
    episodes = whole_episodes(store)
    stats = summary(episodes)
    if _written_by(dataset_id, run_dir):
        minari().delete_dataset(dataset_id)
    write(dataset_id, episodes, spec, algorithm, {**stats, "run_dir": run_dir, "source": "replay"})
    return stats


def _written_by(dataset_id: str, run_dir: str) -> bool:
    m = minari()
    check_id(dataset_id)
    if dataset_id not in m.list_local_datasets():
        return False
    try:
        return m.load_dataset(dataset_id).storage.metadata.get("asyncrl/run_dir") == run_dir
    except Exception:  # unreadable: not this run's to replace
        return False


def _gymnasium_id(env_id: str) -> str | None:
    """``env_id`` where Gymnasium knows it too (Minari then records its spec), else None."""
    try:
        import gymnasium

        gymnasium.spec(env_id)
        return env_id
    except Exception:  # not a Gymnasium id (an EnvPool-only one, e.g. Pong-v5)
        return None


def read_episodes(dataset_id: str, spec: EnvSpec | None = None) -> list[Episode]:
    """Every episode of a local dataset (whoever wrote it), checked: one line when it is missing,
    unreadable, empty, or its spaces do not fit ``spec``."""
    m = minari()
    check_id(dataset_id)
    if dataset_id not in m.list_local_datasets():
        raise DatasetError(f"no local dataset {dataset_id} (minari list local; datasets are read "
                           "from MINARI_DATASETS_PATH, default ~/.minari/datasets)")
    try:
        dataset = m.load_dataset(dataset_id)
        if spec is not None:
            _check_fits(dataset, spec, dataset_id)
        episodes = [Episode(np.asarray(ep.observations), np.asarray(ep.actions), np.asarray(ep.rewards, np.float64),
                            np.asarray(ep.terminations, bool), np.asarray(ep.truncations, bool))
                    for ep in dataset.iterate_episodes()]
    except DatasetError:
        raise
    except Exception as exc:  # a truncated or corrupt file: h5py's, Minari's or numpy's error
        raise DatasetError(f"dataset {dataset_id} is unreadable: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}") from None
    if not episodes or not sum(len(ep.rewards) for ep in episodes):
        raise DatasetError(f"dataset {dataset_id} holds no steps")
    for i, ep in enumerate(episodes):
        if len(ep.observations) != len(ep.rewards) + 1 or len(ep.actions) != len(ep.rewards):
            raise DatasetError(f"dataset {dataset_id}: episode {i} has {len(ep.observations)} observations, "
                               f"{len(ep.actions)} actions and {len(ep.rewards)} rewards "
                               "(observations must be one more than the rest)")
    return episodes


def _check_fits(dataset: Any, spec: EnvSpec, dataset_id: str) -> None:
    from gymnasium import spaces as gs

    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(obs_space, gs.Box) or tuple(obs_space.shape) != spec.obs_shape:
        raise DatasetError(f"dataset {dataset_id} holds observations of {obs_space}; "
                           f"{spec.env_id} has shape {spec.obs_shape}")
    if spec.action_kind == "discrete":
        fits = isinstance(act_space, gs.Discrete) and int(act_space.n) == spec.num_actions
        want = f"{spec.num_actions} discrete actions"
    else:
        fits = isinstance(act_space, gs.Box) and tuple(act_space.shape) == spec.action_shape
        want = f"continuous actions of shape {spec.action_shape}"
    if not fits:
        raise DatasetError(f"dataset {dataset_id} holds actions of {act_space}; {spec.env_id} has {want}")


def summary(episodes: list[Episode]) -> dict[str, float]:
    returns = np.array([ep.ret for ep in episodes])
    return {"episodes": len(episodes), "steps": int(sum(len(ep.rewards) for ep in episodes)),
            "return_mean": float(returns.mean()) if len(returns) else math.nan,
            "return_min": float(returns.min()) if len(returns) else math.nan,
            "return_max": float(returns.max()) if len(returns) else math.nan}
