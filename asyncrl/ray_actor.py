"""Remote actors: each actor (EnvPool plus inference) in a Ray actor on any node of a Ray cluster,
its finished batches shipped back to the loop as Ray objects and ingested into the replay under
the rate limiter, exactly as a process actor's slots are.

The loop's side (:class:`RayActor`) keeps ``calls_in_flight`` calls queued on its remote actor
(:class:`~asyncrl.ray_worker.RemoteActor`, the other side); each call steps ``batches_per_call``
env batches and returns them as one object. The loop awaits
the oldest call's object (ObjectRefs are awaitable: the loop never blocks), ingests its batches,
then queues the next call, so a throttled learner throttles acting as the slots do for process
actors.

Weights: :class:`WeightBroadcast` makes one Ray object per published version (``ray.put`` of the
weight store's flat snapshot), and every call carries the latest version's number and object ref.
A remote actor fetches the object only when the version moved; Ray moves it to each node once,
not once per actor. Each batch comes back with the version that chose its actions.

Faults: Ray restarts a remote actor that died (``max_restarts``). Its calls in flight fail; the
loop counts the loss, forgets the partial episodes and n-step state of that actor's envs, and
queues calls on the restarted actor. Nothing else waits for it: the learner only waits on the
rate limiter, which the other actors keep feeding. ``close`` kills the remote actor for good.

Ray is imported only here (and inside the remote side's methods, in the Ray actor), and this
module only when ``actors.backend = "ray"``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

import numpy as np
import torch

from asyncrl.acting import pack_rng_state, unpack_rng_state
from asyncrl.actor import ActorBase
from asyncrl.config import ConfigError, RayConfig
from asyncrl.core import EnvSpec
from asyncrl.envs import Step
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.ratelimit import LimiterStopped, RateLimiter
from asyncrl.ray_worker import RemoteActor
from asyncrl.weights import WeightStore

log = logging.getLogger("asyncrl")

INSTALL_HINT = 'actors.backend = "ray" needs Ray: pip install -e ".[ray]"'


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def _last_line(exc: BaseException) -> str:
    """The line of a remote traceback that says what went wrong."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


class WeightBroadcast:
    """One Ray object per weight version, made when a call first needs a version newer than the
    last one put; older objects are freed by Ray once no call in flight holds their ref."""

    def __init__(self, ray, store: WeightStore):
        self._ray, self.store = ray, store
        self._flat = torch.zeros(store.num_params, dtype=torch.float32)
        self.version, self.ref = -1, None
        self.puts = 0
        self.nbytes = self._flat.numel() * self._flat.element_size()

    def latest(self) -> tuple[int, Any]:
        if self.store.version != self.version:
            self.version = self.store.read_into(self._flat)
            self.ref = self._ray.put(self._flat.numpy())
            self.puts += 1
        return self.version, self.ref


class RayBackend:
    """The run's connection to Ray: joins (or starts) the cluster, makes the remote actors, and
    leaves Ray as it found it on :meth:`close`."""

    def __init__(self, config: RayConfig, store: WeightStore):
        ray = self.ray = import_ray()
        self.config = config
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
            if config.address is None and not os.environ.get("RAY_ADDRESS"):
                # A Ray of our own, on this machine only: nothing to advertise beyond loopback.
                kwargs["_node_ip_address"] = "127.0.0.1"
            try:
                ray.init(address=config.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"cannot connect to Ray at {config.address!r}: {first}") from None
            self._started = True
        self._check_resources()
        self.broadcast = WeightBroadcast(ray, store)
        self.alive = 0  # remote actors not given up
        self._remote_class = ray.remote(RemoteActor)

    def _check_resources(self) -> None:
        """A remote actor no node can host would wait for ever: say so now, in one line."""
        total = self.ray.cluster_resources()
        wanted = {"CPU": self.config.num_cpus, **self.config.resources}
        missing = {k: v for k, v in wanted.items() if v > 0 and total.get(k, 0) < v}
        if missing:
            self.close()
            have = {k: v for k, v in total.items() if not k.startswith(("node:", "memory", "object_store"))}
            raise ConfigError(f"no Ray node offers what a remote actor asks for ({missing}); the "
                              f"cluster has {have}: see actors.ray.num_cpus and actors.ray.resources")

    def make_actor(self, *args: Any) -> Any:
        c = self.config
        # SPREAD: one actor per node while nodes have room, so actors do not share a node's CPUs.
        # No task retries: a call lost with its actor is noticed (the envs restart), not replayed.
        return self._remote_class.options(
            num_cpus=c.num_cpus, resources=dict(c.resources), max_restarts=c.max_restarts,
            max_task_retries=0, scheduling_strategy="SPREAD").remote(*args)

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


class RayActor(ActorBase):
    """The loop's side of a remote actor: queues its calls and ingests the batches they return."""

    def __init__(self, backend: RayBackend, index: int, spec: EnvSpec, make_env_args: dict[str, Any],
                 algo_name: str, algo_params: dict[str, Any], store: WeightStore, adder,
                 recorder: Recorder, seed: int, pull_every: int,
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None):
        super().__init__(make_env_args["num_envs"], store, adder, recorder)
        self.backend, self.index, self.pull_every = backend, index, pull_every
        self._extras = list(extras or {})
        cfg = backend.config
        self.handle = backend.make_actor(index, make_env_args, algo_name, algo_params, seed,
                                         cfg.batches_per_call, extras)
        backend.alive += 1
        self.node_id: str | None = None
        self.pid: int | None = None
        self.restarts = 0  # deaths survived (Ray restarted the remote actor)
        self.bytes_received = 0  # batch payload shipped to the loop
        self.weight_fetches = 0  # weight objects the remote actor fetched
        self.calls_done = 0  # calls whose batches came back
        self._calls = 0
        # The remote RNG's state after the last call whose batches came back; until then the
        # state it starts from. A state set before run() goes with the first call.
        self._rng = pack_rng_state(np.random.default_rng([seed, index]).bit_generator.state)
        self._rng_to_send: np.ndarray | None = None

    def rng_state(self) -> dict:
        """The remote actor's exploration RNG state as plain (JSON-able) data, as of its last call
        whose batches came back (the calls in flight draw on)."""
        return unpack_rng_state(self._rng)

    def set_rng_state(self, state: dict) -> None:
        """The state the remote RNG acts from; before :meth:`run`, whose first call carries it."""
        if self._calls:
            raise RuntimeError("set_rng_state must come before run(): the remote actor is acting")
        self._rng = self._rng_to_send = pack_rng_state(state)

    def _submit(self) -> Any:
        version, ref = self.backend.broadcast.latest()
        # pull_every counts batches; a remote actor can take new weights at a call's start only.
        pull = (self._calls * self.backend.config.batches_per_call) % self.pull_every < \
            self.backend.config.batches_per_call
        self._calls += 1
        rng, self._rng_to_send = self._rng_to_send, None
        return self.handle.collect.remote(version, [ref], self.recorder.env_steps, pull, rng)

    async def _started(self, timeout: float | None = None) -> None:
        """Wait until the remote actor runs (placed, envs made); note where it runs."""
        try:
            info = await asyncio.wait_for(self.handle.where.remote(),
                                          timeout or self.backend.config.start_timeout_s)
        except TimeoutError:
            raise RunError(f"remote actor {self.index} did not start within "
                           f"{self.backend.config.start_timeout_s:.0f} s (actors.ray.start_timeout_s); "
                           "`ray status` shows what the cluster can place") from None
        self.node_id, self.pid = info["node_id"], info["pid"]

    async def run(self, limiter: RateLimiter, on_steps) -> None:
        ray = self.backend.ray
        in_flight: deque = deque()
        timer = self.recorder.timer
        try:
            try:
                await self._started()
            except ray.exceptions.RayActorError as exc:
                raise RunError(f"remote actor {self.index} could not start: {_last_line(exc)}") from None
            while True:
                while len(in_flight) < self.backend.config.calls_in_flight:
                    in_flight.append(self._submit())
                try:
                    out = await in_flight[0]
                except ray.exceptions.RayActorError as exc:
                    in_flight.clear()  # the later calls died with it
                    if not await self._lost(exc):
                        return
                    continue
                except ray.exceptions.RayTaskError as exc:  # an error inside the actor's code
                    raise RunError(f"remote actor {self.index} failed: {_last_line(exc)}") from None
                in_flight.popleft()
                self.calls_done += 1
                self.bytes_received += sum(a.nbytes for a in out.values())
                env_wait, inference, fetched = out["timing"]
                self._rng = out["rng"].copy()
                self.weight_fetches += int(fetched)
                timer.add("actor_env_wait", env_wait)
                timer.add("actor_inference", inference)
                for k in range(len(out["sizes"])):
                    n = int(out["sizes"][k])
                    step = Step(out["obs"][k, :n], out["rewards"][k, :n], out["terminated"][k, :n],
                                out["truncated"][k, :n], out["env_ids"][k, :n])
                    extras = ({name: out[f"extra_{name}"][k, :n] for name in self._extras}
                              if self._extras else None)
                    await self.ingest(limiter, step, out["actions"][k, :n], extras, int(out["versions"][k]))
                    if on_steps():
                        return
        except LimiterStopped:
            return

    async def _lost(self, exc: Exception) -> bool:
        """The remote actor died. True once Ray restarted it; False when it was given up."""
        self.restarts += 1
        # Its envs start afresh: no transition links an observation from before the death to one
        # after it, and the partial episodes are not counted.
        self.adder.reset()
        self.episodes.reset()
        log.warning("remote actor %d (pid %s) died (%s); Ray restarts it (%d so far)",
                    self.index, self.pid, type(exc).__name__, self.restarts)
        cfg = self.backend.config
        deadline = time.monotonic() + cfg.start_timeout_s
        while self.restarts <= cfg.max_restarts:
            try:  # a call to an actor still restarting fails at once: ask again until it answers
                await self._started(max(0.1, deadline - time.monotonic()))
                return True
            except self.backend.ray.exceptions.RayActorError as again:
                exc = again
            except RunError:  # not back within actors.ray.start_timeout_s
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.backend.alive -= 1
        log.error("remote actor %d is lost after %d restarts (actors.ray.max_restarts = %d): %s",
                  self.index, self.restarts - 1, cfg.max_restarts, _last_line(exc))
        if self.backend.alive == 0:
            raise RunError(f"every remote actor is lost (actors.ray.max_restarts = {cfg.max_restarts}): "
                           "stopping") from None
        return False

    def close(self) -> None:
        """Kill the remote actor for good (no restart); its envs go with its process."""
        try:
            self.backend.ray.kill(self.handle, no_restart=True)
        except Exception as exc:  # Ray already shut down or the actor already gone
            log.debug("killing remote actor %d: %s", self.index, exc)
