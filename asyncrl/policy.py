"""Greedy policies for inference: the live one of a running trainer (:meth:`Trainer.policy`) and
one loaded from a run directory (:func:`load_policy`). Both are callables ``obs -> actions`` with a
network of their own on the CPU."""

from __future__ import annotations

import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from asyncrl import checkpoint as ckpt
from asyncrl import registry
from asyncrl.checkpoint import CheckpointError
from asyncrl.config import Config, ConfigError, read_file, validate
from asyncrl.acting import PolicyStep
from asyncrl.core import Algorithm, EnvSpec, acting_copy
from asyncrl.weights import WeightStore


def spec_to_dict(spec: EnvSpec) -> dict[str, Any]:
    """An :class:`EnvSpec` as plain data (for a checkpoint's manifest)."""
    data = dict(vars(spec))
    data["obs_dtype"] = str(spec.obs_dtype)
    for key in ("action_low", "action_high"):
        data[key] = None if data[key] is None else np.asarray(data[key]).tolist()
    data["obs_shape"], data["action_shape"] = list(spec.obs_shape), list(spec.action_shape)
    return data


def spec_from_dict(data: dict[str, Any]) -> EnvSpec:
    data = dict(data)
    data["obs_dtype"] = np.dtype(data["obs_dtype"])
    data["obs_shape"], data["action_shape"] = tuple(data["obs_shape"]), tuple(data["action_shape"])
    for key in ("action_low", "action_high"):
        if data.get(key) is not None:
            data[key] = np.asarray(data[key], np.float32)
    return EnvSpec(**data)


class Policy:
    """Greedy actions of an algorithm's acting network: ``policy(obs)``.

    One observation (shaped like ``spec.obs_shape``) gives one action; a batch gives a batch.
    Calls are serialised by a lock, so any thread may call it; the network is the policy's own
    (on the CPU), never one that the learner or an actor is using.
    """

    def __init__(self, algo: Algorithm, network: torch.nn.Module, spec: EnvSpec, version: int = 0,
                 env_steps: int | None = None, store: WeightStore | None = None):
        self.algo, self.network, self.spec = algo, network.eval(), spec
        self.version = version  # weight version the network holds
        self.env_steps = env_steps  # env steps of the checkpoint it was loaded from (loaded policies)
        self._weights = store  # where a live policy's newer weights come from; None: they never change
        self._lock = threading.Lock()
        self._rows = 0  # a recurrent policy's batch size: its state has one row each
        self._step = self._policy_step(1)

    def _policy_step(self, rows: int) -> PolicyStep:
        # Greedy acting draws nothing; the protocol wants an RNG all the same. Every call looks
        # for newer weights (a version check when there are none).
        return PolicyStep(self.algo, rows, np.random.default_rng(0), store=self._weights, greedy=True,
                          network=self.network, version=self.version)

    def __call__(self, obs: Any) -> np.ndarray:
        obs = np.asarray(obs, dtype=self.spec.obs_dtype)
        single = obs.shape == self.spec.obs_shape
        if not single and obs.shape[1:] != self.spec.obs_shape:
            raise ValueError(f"observation of shape {obs.shape}; {self.spec.env_id} expects "
                             f"{self.spec.obs_shape} or a batch of them")
        batch = obs[None] if single else obs
        with self._lock:
            rows = len(batch)
            if self._step.states is not None and self._rows != rows:
                self._step, self._rows = self._policy_step(rows), rows
            # No row ever ends an episode here: the caller says so with reset().
            acted = self._step.act(batch, np.arange(rows), 0)
            self.version = acted.weight_version
        return acted.actions[0] if single else acted.actions

    def reset(self) -> None:
        """A recurrent policy forgets its state: call it when a new episode begins (a call with
        another batch size starts afresh too). Feed-forward policies hold no state."""
        with self._lock:
            self._rows = 0


class LivePolicy(Policy):
    """The policy a trainer is learning, refreshed from its weight store whenever a newer version
    was published (the store's seqlock read: the learner never waits for it). It binds to the
    trainer's networks at its first call, which must come once ``run()`` has built them.
    ``parts`` returns the trainer's algorithm, env spec and weight store, or None before they
    exist."""

    def __init__(self, parts: Callable[[], tuple[Algorithm, EnvSpec, WeightStore] | None]):
        self._parts = parts
        self._bind_lock = threading.Lock()
        self._store = None
        self.version = -1

    def __call__(self, obs: Any) -> np.ndarray:
        if self._store is None:
            self._bind()
        return super().__call__(obs)

    def _bind(self) -> None:
        with self._bind_lock:
            if self._store is not None:
                return
            parts = self._parts()
            if parts is None:
                raise RuntimeError("the trainer has not built its networks yet: "
                                   "call the policy once run() has started")
            algo, spec, store = parts
            super().__init__(algo, acting_copy(algo), spec, version=-1, store=store)
            self._store = store  # last: other threads take it as "bound"


def load_policy(run_dir: str | Path, checkpoint: str | Path | None = None) -> Policy:
    """The greedy policy of a run's checkpoint (the newest loadable one unless ``checkpoint``
    names one, e.g. ``step_000000050000``), built from the run's ``config.json`` on the CPU;
    no env, replay or learner is made. Tensors load with ``torch.load(weights_only=True)``.

    The algorithm's networks need the env's :class:`EnvSpec`: checkpoints carry it in their
    manifest (so runs on a Python env factory load too, and no env library runs here); an older
    checkpoint without it gets it from one env of the config's id. A checkpoint that does not
    load or does not fit the config (tensors of other shapes, missing keys) is passed over for
    the next older one; :class:`CheckpointError` (one line) when none is left, or when the
    named one is such a checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    try:
        config = validate(read_file(run_dir / "config.json"))
    except ConfigError as exc:
        raise CheckpointError(f"{run_dir}/config.json: {exc}") from None
    cls = registry.get(config.algo.name)
    params = registry.algo_config(cls, config.algo.params)
    probed: list[EnvSpec] = []  # one env probe at most, for checkpoints without a spec
    built: dict[str, Any] = {}

    def build_and_load(path: Path, manifest: dict[str, Any], state: dict[str, Any]) -> None:
        # Raises (KeyError, a size-mismatch RuntimeError, ValueError) when the checkpoint does
        # not fit the run's config: load_latest then falls back to an older one.
        if "env_spec" in manifest:
            spec = spec_from_dict(manifest["env_spec"])
        else:
            probed[:] = probed or [_probe_spec(config)]
            spec = probed[0]
        algo = cls(spec, params, torch.device("cpu"))
        algo.load_state_dict(state["algo"])
        built.update(algo=algo, spec=spec)

    if checkpoint is None:
        _, manifest, _ = ckpt.load_latest(run_dir / "checkpoints", accept=build_and_load)
    else:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / "checkpoints" / checkpoint
        manifest, _ = ckpt.load(path, accept=build_and_load)
    algo = built["algo"]
    return Policy(algo, algo.acting_network, built["spec"], manifest.get("weight_version", 0),
                  manifest.get("env_steps"))


def _probe_spec(config: Config) -> EnvSpec:
    from asyncrl.envs import make_env

    with make_env(config.env.id, 1, None, config.train.seed, config.env.kwargs,
                  obs_indices=config.env.obs_indices) as env:
        return env.spec
