"""The acting core: one policy step, the same wherever acting runs.

:class:`PolicyStep` holds an algorithm's acting network (its own copy), where its weights come
from and how often it looks (``pull_every`` batches, a pull only when the version moved), the
exploration RNG, and for a recurrent algorithm each env's state and which envs begin an episode
at their next observation. :meth:`PolicyStep.act` turns a batch of observations into an
:class:`Acted`: the actions, what the policy returned beside them, the state each action was
chosen with, and the weight version that chose them.

Inline actors and serial mode, process workers, Ray's remote actors, evaluation and the live and
loaded :class:`~asyncrl.policy.Policy` all act through it; they differ only in how batches and
weights travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from asyncrl.core import Algorithm, StateSpec, acting_copy, actor_state_spec
from asyncrl.weights import READ_TIMEOUT_S, PublishTimeout, WeightStore

_NONE: dict[str, np.ndarray] = {}  # shared and never written: no per-batch dict for "nothing"


@dataclass(slots=True)
class Acted:
    """What a policy step chose for one batch: what an adder records beside the observations."""

    actions: np.ndarray
    extras: dict[str, np.ndarray]  # what ``algo.act`` returned beside the actions (trajectory data)
    state: dict[str, np.ndarray]  # the recurrent state each action was chosen with (sequence data)
    weight_version: int  # the weights that chose the actions


class EnvStates:
    """Each env's actor state (e.g. an LSTM's h and c) as an algorithm declares it: zeros at an
    episode's first observation, then whatever the policy returned at the env's previous step."""

    def __init__(self, spec: StateSpec, num_envs: int):
        self._arrays = {name: np.zeros((num_envs, *shape), dtype) for name, (shape, dtype) in spec.items()}

    def reset(self, env_ids) -> None:
        for array in self._arrays.values():
            array[env_ids] = 0

    def get(self, env_ids) -> dict[str, np.ndarray]:
        return {name: array[env_ids] for name, array in self._arrays.items()}

    def set(self, env_ids, state: dict[str, torch.Tensor | np.ndarray]) -> None:
        for name, array in self._arrays.items():
            value = state[name]
            array[env_ids] = value.cpu().numpy() if isinstance(value, torch.Tensor) else value


class PolicyStep:
    """One implementation of "pull weights when due, act, split the extras, carry the state".

    ``store``: the weight store to pull from every ``pull_every`` batches (when its version
    moved); None where weights arrive otherwise (:meth:`load_flat`, a loaded policy's fixed
    ones). ``greedy``: no exploration (evaluation, policies). ``network``: an acting network to
    use instead of a fresh copy. ``version``: the weight version the network holds. A pull waits
    at most ``pull_timeout`` for a publish in progress; then ``on_stuck_publish`` (if given) may
    raise to give up, else the pull tries again; without it :class:`PublishTimeout` is raised.
    """

    def __init__(self, algo: Algorithm, num_envs: int, rng: np.random.Generator, *,
                 store: WeightStore | None = None, pull_every: int = 1, greedy: bool = False,
                 network: torch.nn.Module | None = None, version: int = 0,
                 pull_timeout: float = READ_TIMEOUT_S, on_stuck_publish: Callable[[], None] | None = None):
        if pull_every < 1:
            raise ValueError(f"pull_every must be >= 1, got {pull_every}")
        self.algo, self.rng, self.store, self.greedy = algo, rng, store, greedy
        self.network = acting_copy(algo) if network is None else network
        self.pull_every, self.version = pull_every, version
        self._pull_timeout, self._on_stuck_publish = pull_timeout, on_stuck_publish
        self._batches = 0
        spec = actor_state_spec(algo)
        self.states = EnvStates(spec, num_envs) if spec else None
        # Only a recurrent policy needs to know where episodes begin (to zero their state).
        self._starts = np.ones(num_envs, bool) if spec else None

    def act(self, obs: np.ndarray, env_ids: np.ndarray, env_steps: int,
            terminated: np.ndarray | None = None, truncated: np.ndarray | None = None) -> Acted:
        """Actions for ``obs``, the observations of envs ``env_ids``; ``env_steps`` drives the
        exploration schedule. ``terminated`` / ``truncated`` (what the env returned with ``obs``)
        mark the envs whose next observation begins an episode; a caller whose rows never end
        an episode (a :class:`~asyncrl.policy.Policy`) leaves them out."""
        if self.store is not None and self._batches % self.pull_every == 0:
            self.pull()
        self._batches += 1
        first = next(iter(self.network.parameters()), None)  # obs and states go where the network is
        device = first.device if first is not None else torch.device("cpu")  # .to(cpu) of a CPU tensor: itself
        with torch.inference_mode():  # ~30% less per-op overhead than no_grad for small nets
            if self.states is None:
                out = self.algo.act(self.network, torch.from_numpy(obs).to(device), env_steps, self.rng,
                                    greedy=self.greedy)
                if isinstance(out, tuple):
                    return Acted(out[0], out[1], _NONE, self.version)
                return Acted(out, _NONE, _NONE, self.version)
            self.states.reset(env_ids[self._starts[env_ids]])
            state = self.states.get(env_ids)
            actions, next_state = self.algo.act(
                self.network, torch.from_numpy(obs).to(device), env_steps, self.rng, greedy=self.greedy,
                state={k: torch.from_numpy(v).to(device) for k, v in state.items()})
        self.states.set(env_ids, next_state)
        if terminated is not None:
            self._starts[env_ids] = terminated | truncated
        return Acted(actions, _NONE, state, self.version)

    def pull(self) -> None:
        """The store's latest weights into the network, if newer than the ones it holds."""
        while True:
            try:
                version = self.store.pull(self.network, self.version, timeout=self._pull_timeout)
                break
            except PublishTimeout:
                if self._on_stuck_publish is None:
                    raise
                self._on_stuck_publish()  # raises to give up; else wait for the publish again
        if version is not None:
            self.version = version

    def load_flat(self, flat: torch.Tensor, version: int) -> None:
        """Weights that travelled as one flat tensor (a Ray object) into the network: its
        parameters become views of ``flat``, which the caller must not write afterwards."""
        torch.nn.utils.vector_to_parameters(flat, self.network.parameters())
        self.version = version

    def episodes_restart(self) -> None:
        """Every env's next observation begins an episode (the envs were reset)."""
        if self._starts is not None:
            self._starts[:] = True

    def rng_state(self) -> dict:
        """The exploration RNG's state as plain (JSON-able) data, for a checkpoint."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


RNG_WORDS = 6
_MASK64 = (1 << 64) - 1


def pack_rng_state(state: dict) -> np.ndarray:
    """A PCG64 state (what ``default_rng`` makes) as six int64 words, the form in which a worker's
    RNG state travels (start message, slots, a remote actor's results): the 128-bit state and
    increment in 64-bit halves, then the buffered 32-bit draw."""
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"a process actor's RNG is a PCG64, not {state.get('bit_generator')!r}")
    s, inc = state["state"]["state"], state["state"]["inc"]
    return np.array([s & _MASK64, s >> 64, inc & _MASK64, inc >> 64, state["has_uint32"],
                     state["uinteger"]], np.uint64).view(np.int64)


def unpack_rng_state(words: np.ndarray) -> dict:
    """The state dict (``bit_generator.state``) that :func:`pack_rng_state` packed."""
    w = [int(x) for x in np.asarray(words, np.int64).view(np.uint64)]
    return {"bit_generator": "PCG64", "state": {"state": w[0] | w[1] << 64, "inc": w[2] | w[3] << 64},
            "has_uint32": w[4], "uinteger": w[5]}
