"""Central inference: process actors only step their envs; one task in the main process acts for
all of them, in one forward on the learner's device (``actors.inference = "central"``).

A worker in this mode holds no network and imports no algorithm. For each batch it writes the
observations, their env ids and how the envs' previous steps ended into its :class:`Requests`
(shared memory) and sends the loop a request record; its actor hands the request to the run's
:class:`CentralInference`. That task takes every request waiting, acts on all of them at once
through one :class:`~asyncrl.acting.PolicyStep` (the acting core, unchanged: weights pulled from
the weight store onto the learner's device when the version moved, each env's recurrent state
kept here by its stream), writes each worker's actions, extras and states back into its
requests and wakes it. The worker then sends its actions to the envs and runs its adder as in
local inference: only the forward moved. No weights travel to the workers at all.

The batch is whatever is waiting when the task runs (never a wait for more): a fast forward
serves each worker at once, a slow one (a large network, many workers) gathers more per forward.
On a GPU the forward (and its device sync) runs in a worker thread, so the loop goes on taking
records while it is in flight; on the CPU it runs in the loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from asyncrl.acting import Acted, PolicyStep
from asyncrl.core import Algorithm, EnvSpec, TrajectoryData, acting_copy, actor_state_spec
from asyncrl.shm import shared_zeros

if TYPE_CHECKING:  # the worker imports this module: no more than it needs
    from asyncrl.envs import Step
    from asyncrl.metrics import Recorder
    from asyncrl.weights import WeightStore


class Requests:
    """One process actor's request slot in shared memory: what its worker asks (a batch's
    observations, env ids, and whether each env's previous step ended its episode) and what the
    loop answers (the actions, what the policy returned beside them, the recurrent state each
    was chosen with, the weight version). Made in the loop's process; travels to the worker as
    the shared tensors; numpy views are made on either side by :meth:`attach`."""

    def __init__(self, obs: tuple[tuple[int, ...], np.dtype], actions: tuple[tuple[int, ...], np.dtype],
                 extras: dict[str, tuple[tuple[int, ...], np.dtype]],
                 state: dict[str, tuple[tuple[int, ...], np.dtype]], batch: int):
        def zeros(shape, dtype):
            return shared_zeros((batch, *shape), np.dtype(dtype))

        self._asked = {"obs": zeros(*obs), "env_ids": zeros((), np.int64),
                       "terminated": zeros((), bool), "truncated": zeros((), bool)}
        self._answered = {"actions": zeros(*actions), "version": shared_zeros((1,), np.dtype(np.int64)),
                          **{f"extras/{k}": zeros(*v) for k, v in extras.items()},
                          **{f"state/{k}": zeros(*v) for k, v in state.items()}}
        self._views: dict[str, np.ndarray] = {}
        self.attach()

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_views"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.attach()

    def attach(self) -> None:
        self._views = {name: t.numpy() for name, t in {**self._asked, **self._answered}.items()}

    # --- the worker's side ---

    def ask(self, step: Step) -> None:
        """A received batch into the slot (before the request record goes out)."""
        v, n = self._views, len(step.env_ids)
        v["obs"][:n] = step.obs
        v["env_ids"][:n] = step.env_ids
        v["terminated"][:n] = step.terminated
        v["truncated"][:n] = step.truncated

    def answer(self, n: int) -> Acted:
        """The loop's answer for the batch of ``n`` envs asked last (copies: the slot is reused)."""
        v = self._views
        part = {name: v[name][:n].copy() for name in v if name.startswith(("extras/", "state/"))}
        return Acted(v["actions"][:n].copy(),
                     {k[7:]: a for k, a in part.items() if k.startswith("extras/")},
                     {k[6:]: a for k, a in part.items() if k.startswith("state/")},
                     int(v["version"][0]))

    # --- the loop's side ---

    def asked(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        v = self._views
        return v["obs"][:n], v["env_ids"][:n], v["terminated"][:n], v["truncated"][:n]

    def reply(self, at: slice, acted: Acted) -> None:
        """Rows ``at`` of what the central policy step chose, as this slot's answer."""
        v, n = self._views, at.stop - at.start
        v["actions"][:n] = acted.actions[at]
        for name, value in acted.extras.items():
            if f"extras/{name}" in v:  # what the data kind does not store is not carried
                v[f"extras/{name}"][:n] = value[at]
        for name, value in acted.state.items():
            v[f"state/{name}"][:n] = value[at]
        v["version"][0] = acted.weight_version


class CentralInference:
    """The run's one inference task for its process actors (see the module docstring).

    ``algo``'s acting network (for envs of ``spec``) is copied onto ``device`` (the learner's) and pulled from
    ``store`` every ``pull_every`` forwards when the version moved; ``num_streams`` envs in all,
    each actor's at ``first_stream ...``; ``rng`` draws the exploration of every actor."""

    def __init__(self, algo: Algorithm, spec: EnvSpec, store: WeightStore, device: torch.device,
                 num_streams: int, rng: np.random.Generator, pull_every: int, recorder: Recorder):
        self.device, self.recorder = device, recorder
        self.policy = PolicyStep(algo, num_streams, rng, store=store, pull_every=pull_every,
                                 network=acting_copy(algo).to(device))
        self._layout = dict(obs=(spec.obs_shape, spec.obs_dtype), actions=(spec.action_shape, spec.action_dtype),
                            extras=dict(algo.data.extras) if isinstance(algo.data, TrajectoryData) else {},
                            state=actor_state_spec(algo))
        # On a GPU the forward ends in a device sync (the actions back to the host): it runs off
        # the loop's thread there, so the loop takes the other workers' records meanwhile and
        # their requests gather into the next forward. On the CPU the forward is Python and
        # arithmetic under the GIL, where a thread hop (20-95 us) would only add to it.
        self.threaded = device.type == "cuda"
        self._actors = 0
        self._waiting: list[tuple[Requests, int, int, Callable[[], None]]] = []
        self._wake = asyncio.Event()
        self._open = 0

    def requests(self, batch: int) -> Requests:
        """A request slot for one more actor, whose batches hold at most ``batch`` envs."""
        self._actors += 1
        return Requests(**self._layout, batch=batch)

    def ask(self, requests: Requests, first_stream: int, count: int, reply: Callable[[], None]) -> None:
        """A worker's request (``count`` envs in ``requests``); ``reply`` wakes it once answered.
        Called from the actor's pipe reader: nothing but a note and a wake-up."""
        self._waiting.append((requests, first_stream, count, reply))
        self._wake.set()

    def actor_done(self) -> None:
        """An actor's run ended: once every actor's has, so does :meth:`run`."""
        self._open -= 1
        self._wake.set()

    async def run(self) -> None:
        """Answer every request waiting, in one forward each time, while any actor runs."""
        self._open = self._actors
        timer = self.recorder.timer
        while self._open > 0:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            if not waiting:
                continue
            t0 = time.perf_counter()
            asks = [(r, first, n) for r, first, n, _ in waiting]
            if self.threaded:
                await asyncio.to_thread(self.act, asks)
            else:
                self.act(asks)
            for *_, reply in waiting:
                reply()
            timer.add("inference", time.perf_counter() - t0)

    def act(self, asks: list[tuple[Requests, int, int]]) -> Acted:
        """One forward for the requests ``(requests, first_stream, count)``; answers each in
        place and returns what the policy step chose for all of them (in that order)."""
        parts = [r.asked(n) for r, _, n in asks]
        if len(parts) == 1:  # the common case with few actors: no gathering copy
            obs, env_ids, terminated, truncated = parts[0]
            env_ids = env_ids + asks[0][1]
        else:
            obs = np.concatenate([p[0] for p in parts])
            env_ids = np.concatenate([p[1] + first for p, (_, first, _) in zip(parts, asks)])
            terminated = np.concatenate([p[2] for p in parts])
            truncated = np.concatenate([p[3] for p in parts])
        acted = self.policy.act(obs, env_ids, self.recorder.env_steps, terminated, truncated)
        start = 0
        for requests, _, n in asks:
            requests.reply(slice(start, start + n), acted)
            start += n
        return acted
