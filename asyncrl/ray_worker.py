"""The remote side of a Ray actor (:mod:`asyncrl.ray_actor` is the loop's side):
:class:`RemoteActor` runs inside a Ray actor on any node, owns one env pool and a CPU copy of the
acting network, and answers each call with ``batches_per_call`` env batches in one object
(:func:`write_batch` fills it), fetching new weights only when the version moved.

Ray itself is imported inside the methods that run in the Ray actor: importing this module does
not import Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from asyncrl.acting import Acted, PolicyStep, pack_rng_state, unpack_rng_state
from asyncrl.envs import Step


def write_batch(views: dict[str, np.ndarray], slot: int, step: Step, acted: Acted) -> int:
    """Write one batch into slot ``slot`` of ``views`` (the arrays a call returns, a slot per
    leading index): what the env returned, the actions chosen with their extras and the
    actor state each saw, then the batch's size, last. Returns the size. A remote actor
    fills its answer with it."""
    n = len(step.env_ids)
    views["obs"][slot, :n] = step.obs
    views["rewards"][slot, :n] = step.rewards
    views["terminated"][slot, :n] = step.terminated
    views["truncated"][slot, :n] = step.truncated
    views["env_ids"][slot, :n] = step.env_ids
    views["actions"][slot, :n] = acted.actions
    for name, value in acted.extras.items():
        views[f"extra_{name}"][slot, :n] = value
    for name, value in acted.state.items():
        views[f"state_{name}"][slot, :n] = value
    views["sizes"][slot] = n
    return n


class RemoteActor:
    """Runs inside a Ray actor: owns one env pool and a CPU copy of the acting network."""

    def __init__(self, index: int, make_env_args: dict[str, Any], algo_name: str,
                 algo_params: dict[str, Any], seed: int, batches_per_call: int,
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]] | None):
        torch.set_num_threads(1)  # one thread is fastest for acting networks (BENCHMARKS.md)
        from asyncrl import registry
        from asyncrl.envs import make_env

        self.env = make_env(**make_env_args)
        spec = self.env.spec
        cls = registry.get(algo_name)
        self.algo = cls(spec, registry.algo_config(cls, algo_params), torch.device("cpu"))
        self.policy = PolicyStep(self.algo, self.env.num_envs, np.random.default_rng([seed, index]))
        k, b = batches_per_call, make_env_args.get("batch_size") or make_env_args["num_envs"]
        # Reused across calls: Ray serialises a call's result before the next call runs.
        self.out: dict[str, np.ndarray] = {
            "obs": np.zeros((k, b, *spec.obs_shape), spec.obs_dtype),
            "rewards": np.zeros((k, b), np.float32),
            "terminated": np.zeros((k, b), bool),
            "truncated": np.zeros((k, b), bool),
            "env_ids": np.zeros((k, b), np.int64),
            "actions": np.zeros((k, b, *spec.action_shape), spec.action_dtype),
            "sizes": np.zeros(k, np.int64),
            "versions": np.zeros(k, np.int64),
            # seconds in env wait, in inference; weight objects fetched in this call
            "timing": np.zeros(3, np.float64),
            "rng": pack_rng_state(self.policy.rng_state()),  # the RNG after the call
        }
        for name, (shape, dtype) in (extras or {}).items():
            self.out[f"extra_{name}"] = np.zeros((k, b, *shape), np.dtype(dtype))
        self.env.async_reset()

    def where(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def collect(self, version: int, weights: list, env_steps: int, pull: bool,
                rng: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Step ``batches_per_call`` batches with the latest weights; ``weights`` holds the
        version's object ref (in a list, so that Ray passes the ref and not the object).
        ``rng``: a packed RNG state to act from (a resumed run's first call)."""
        out, fetched, policy = self.out, 0, self.policy
        if rng is not None:
            policy.set_rng_state(unpack_rng_state(rng))
        if pull and version > policy.version:
            import ray

            # The object store's copy is read-only: the network gets a copy of its own.
            policy.load_flat(torch.tensor(ray.get(weights[0])), version)
            fetched = 1
        env_wait = inference = 0.0
        for k in range(len(out["sizes"])):
            t0 = time.perf_counter()
            step = self.env.recv()
            t1 = time.perf_counter()
            acted = policy.act(step.obs, step.env_ids, env_steps, step.terminated, step.truncated)
            self.env.send(acted.actions, step.env_ids)
            t2 = time.perf_counter()
            write_batch(out, k, step, acted)
            out["versions"][k] = acted.weight_version
            env_wait += t1 - t0
            inference += t2 - t1
        out["timing"][:] = (env_wait, inference, fetched)
        out["rng"][:] = pack_rng_state(policy.rng_state())
        return out
