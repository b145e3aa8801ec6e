"""The contracts between the engine and the algorithms: interfaces only.

An algorithm (in ``algos/``) builds its networks from an :class:`EnvSpec`, names the data it needs
(:class:`TransitionData` off-policy, :class:`TrajectoryData` on-policy, :class:`SequenceData`
for recurrent off-policy learners), selects actions with
:meth:`Algorithm.act` and learns from a :class:`TransitionBatch`, :class:`TrajectoryBatch` or
:class:`SequenceBatch` in :meth:`Algorithm.update`. It knows nothing of asyncio, EnvPool or the
replay: the engine owns those and hands it tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel


@dataclass(frozen=True)
class EnvSpec:
    """What an algorithm may know of an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype  # as stored in replay: uint8 frames stay uint8, float64 becomes float32
    action_kind: Literal["discrete", "continuous"]
    num_actions: int  # discrete: number of actions; continuous: 0
    action_shape: tuple[int, ...]  # discrete: (); continuous: (action_dim,)
    action_low: np.ndarray | None = None  # continuous only
    action_high: np.ndarray | None = None
    max_episode_steps: int | None = None

    @property
    def action_dtype(self) -> np.dtype:
        return np.dtype(np.int64 if self.action_kind == "discrete" else np.float32)


@dataclass(frozen=True)
class TransitionData:
    """Off-policy data an algorithm asks for: n-step transitions discounted by ``gamma``."""

    n_step: int
    gamma: float


@dataclass
class TransitionBatch:
    """A sampled batch of n-step transitions, as tensors on the learner's device.

    ``rewards`` holds the discounted n-step return and ``discounts`` the factor on the bootstrap
    value: ``gamma**k`` after k steps, 0 when the episode *terminated* within them (a truncated
    episode still bootstraps from its final observation).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    discounts: torch.Tensor
    next_obs: torch.Tensor
    weights: torch.Tensor  # importance weights (all ones for uniform replay)


@dataclass(frozen=True)
class TrajectoryData:
    """On-policy data an algorithm asks for: fixed-length trajectories, one env each, handed to
    the learner through a FIFO queue (every trajectory is consumed exactly once).

    ``extras`` declares what :meth:`Algorithm.act` returns beside the actions (e.g. the behaviour
    policy's log-probs), per env: name -> (shape, dtype), so actors and the queue preallocate it.
    ``wait_for_learner``: after each trajectory, acting pauses until the learner has published
    weights trained on it (policy lag 0, as PPO assumes); the learner then takes every env's
    trajectory at once. Otherwise actors never wait for the learner (IMPALA) and only the queue's
    capacity bounds them.
    """

    length: int
    extras: dict[str, tuple[tuple[int, ...], np.dtype]]
    wait_for_learner: bool = False


@dataclass
class TrajectoryBatch:
    """Trajectories as tensors on the learner's device, time first: ``[T, B, ...]``.

    Row t is one decision: ``obs[t]``, the ``actions[t]`` chosen there (with ``extras[t]``), and
    what the env returned for it: ``rewards[t]``, ``terminated[t]`` (the episode ended: do not
    bootstrap), ``truncated[t]`` (cut by a time limit: bootstrap from ``obs[t + 1]``, the episode's
    final observation). ``obs`` has one more row, the bootstrap observation. ``applied[t]`` is
    False where ``obs[t]`` was an episode's final observation: the env ignored that action and
    reset (EnvPool's reset step), so row t is no transition and must be masked out.
    """

    obs: torch.Tensor  # [T + 1, B, *obs_shape]
    actions: torch.Tensor  # [T, B, *action_shape]
    rewards: torch.Tensor  # [T, B] float32
    terminated: torch.Tensor  # [T, B] bool
    truncated: torch.Tensor  # [T, B] bool
    applied: torch.Tensor  # [T, B] bool
    extras: dict[str, torch.Tensor]  # [T, B, *shape] each, as declared in TrajectoryData.extras
    weight_version: torch.Tensor  # [B] int64: the weights that chose each trajectory's first action


@dataclass(frozen=True)
class SequenceData:
    """Off-policy data as fixed-length sequences (recurrent learners such as R2D2).

    Each env's steps are stored once, in order; a sequence is a window of ``length`` consecutive
    steps of one episode, and one starts every ``period`` steps from each episode's first step, so
    consecutive sequences overlap by ``length - period`` steps. The actor state (see
    :attr:`Algorithm.actor_state`) at a sequence's first step comes with it. Sequences are sampled
    by priority (or uniformly) and never cross an episode end: the rows after it are zeros.
    """

    length: int
    period: int


@dataclass
class SequenceBatch:
    """Sampled sequences as tensors on the learner's device, time first: ``[T, B, ...]``.

    Row t holds ``obs[t]``, the ``actions[t]`` chosen there and what the env returned for it
    (``rewards[t]``, ``terminated[t]``, ``truncated[t]``). ``applied[t]`` is True where row t is
    a decision of the episode; False at the episode's final observation (which is still there, to
    bootstrap from after a truncation) and on the zero padding after it. ``valid[t]`` is True where
    ``obs[t]`` belongs to the episode (its decisions and its final observation). ``state`` is the
    actor state the acting network had at row 0, as :attr:`Algorithm.actor_state` declares it.
    """

    obs: torch.Tensor  # [T, B, *obs_shape]
    actions: torch.Tensor  # [T, B, *action_shape]
    rewards: torch.Tensor  # [T, B] float32
    terminated: torch.Tensor  # [T, B] bool
    truncated: torch.Tensor  # [T, B] bool
    applied: torch.Tensor  # [T, B] bool
    valid: torch.Tensor  # [T, B] bool
    state: dict[str, torch.Tensor]  # [B, *shape] each
    weights: torch.Tensor  # [B] importance weights (all ones for uniform replay)


# Per-env actor state an algorithm declares (name -> (shape, dtype)), e.g. an LSTM's h and c.
StateSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


# Scalars; 0-dim tensors are welcome (the engine converts them only when it logs, sparing a
# device sync per update).
Metrics = dict[str, "float | torch.Tensor"]


@runtime_checkable
class Algorithm(Protocol):
    """What the engine needs of an algorithm. Implementations register under the
    ``asyncrl.algorithms`` entry-point group (see ``pyproject.toml``)."""

    Config: ClassVar[type[BaseModel]]  # its hyperparameters; validated from the ``[algo]`` table
    preset: ClassVar[dict[str, Any]]  # the run config ``python -m asyncrl run NAME`` starts from

    def __init__(self, spec: EnvSpec, config: BaseModel, device: torch.device) -> None: ...

    @property
    def data(self) -> TransitionData | TrajectoryData | SequenceData: ...

    @property
    def acting_network(self) -> torch.nn.Module:
        """The learner-side module whose parameters are broadcast to actors."""
        ...

    def make_acting_network(self) -> torch.nn.Module:
        """A fresh CPU module with the acting network's structure, for an actor to load weights into."""
        ...

    def act(
        self,
        network: torch.nn.Module,
        obs: torch.Tensor,
        env_steps: int,
        rng: np.random.Generator,
        greedy: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions for a batch of observations, with exploration unless ``greedy``.
        ``env_steps`` drives exploration schedules; ``rng`` is the actor's own generator.
        An algorithm whose :class:`TrajectoryData` declares extras returns ``(actions, extras)``.

        A recurrent algorithm declares ``actor_state`` (a :data:`StateSpec`, see
        :func:`actor_state_spec`); its ``act`` then takes ``state=`` (each env's state, a dict of
        ``[B, *shape]`` tensors) and returns ``(actions, next_state)``. The engine keeps each
        env's state, carries it from step to step and zeroes it at every episode's start."""
        ...

    def update(self, batch: TransitionBatch | TrajectoryBatch | SequenceBatch
               ) -> tuple[Metrics, torch.Tensor | None]:
        """One update (off-policy: one gradient step; on-policy: all of a batch's epochs).
        Returns metrics (keys without prefix, e.g. ``td_loss``) and the new priorities of the
        batch's items, or None when the algorithm does not use priorities."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume learning (networks, targets, optimizer, counters)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def actor_state_spec(algo: Algorithm) -> StateSpec:
    """The per-env state an algorithm's actors carry; empty for a feed-forward policy."""
    return dict(getattr(algo, "actor_state", None) or {})


def needs_dataset(algo: Algorithm | type) -> bool:
    """Whether an algorithm learns from a dataset only (it declares ``needs_dataset = True``:
    behaviour cloning, say), never from its own acting."""
    return bool(getattr(algo, "needs_dataset", False))


def acting_copy(algo: Algorithm) -> torch.nn.Module:
    """A network for acting only: the algorithm's acting network in eval mode with no parameter
    that requires grad (weights come from the weight store; a forward pass records nothing)."""
    return algo.make_acting_network().eval().requires_grad_(False)


def split_actions(out: np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(actions, extras)`` from what :meth:`Algorithm.act` returned (extras may be empty)."""
    if isinstance(out, tuple):
        return out
    return out, {}
