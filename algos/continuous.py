"""What SAC and TD3 share: the config fields of an off-policy actor-critic for continuous actions,
the Pendulum-v1 preset they train on out of the box, and acting's warm-up and bounds."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from algos.nets import Widths
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, TransitionBatch, TransitionData


class ContinuousConfig(ConfigModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    actor_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the policy.")
    critic_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the twin critics.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    n_step: int = Field(1, ge=1, description="Steps summed before bootstrapping.")
    hidden: Widths = Field([256, 256], description="MLP widths of the policy and of each critic.")
    tau: float = Field(0.005, gt=0, le=1, description="Polyak weight of the target networks' update.")
    random_steps: int = Field(
        5_000, ge=0, description="Env steps at the start with uniform random actions (warm-up).")
    parallel_losses: bool = Field(
        True, description="On a CPU learner with one torch thread: the critic loss and its gradient "
        "in a second thread while the policy's run in this one (their gradients are disjoint: the "
        "same numbers), so an update uses two cores.")


def pendulum_preset(name: str, **algo: Any) -> dict[str, Any]:
    """A built-in default that trains at once on a 2-core CPU: Pendulum-v1, one update per env
    step on small networks, stopping once a greedy evaluation reaches -200 (BENCHMARKS.md)."""
    return {
        "algo": {"name": name, "hidden": [64, 64], "actor_lr": 1e-3, "critic_lr": 1e-3,
                 "random_steps": 1_000, **algo},
        "env": {"id": "Pendulum-v1", "num_envs": 4},
        "replay": {"capacity": 100_000, "min_size_to_sample": 1_000, "samples_per_insert": 128.0},
        "learner": {"batch_size": 128},
        "train": {"total_env_steps": 50_000, "eval_every": 2_000, "eval_episodes": 10,
                  "target_return": -200.0},
    }


class ContinuousActorCritic:
    """The parts of SAC and TD3 that are the same: n-step transitions, the actor as the acting
    network, uniform random actions for the warm-up, actions clipped to the bounds."""

    spec: EnvSpec
    config: ContinuousConfig
    device: torch.device
    actor: nn.Module
    critic: nn.Module

    @property
    def data(self) -> TransitionData:
        return TransitionData(n_step=self.config.n_step, gamma=self.config.gamma)

    @property
    def acting_network(self) -> nn.Module:
        return self.actor

    def warm_up(self, obs: torch.Tensor, env_steps: int, rng: np.random.Generator,
                greedy: bool) -> np.ndarray | None:
        """Uniform random actions while the warm-up lasts (never for a greedy policy), else None."""
        if greedy or env_steps >= self.config.random_steps:
            return None
        low, high = self.spec.action_low, self.spec.action_high
        return rng.uniform(low, high, size=(len(obs), *self.spec.action_shape)).astype(np.float32)

    def td_loss(self, target: torch.Tensor, batch: TransitionBatch
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the twin critics' squared TD loss toward ``target``, their values, the TD errors),
        both ``(2, batch)``."""
        q = self.critic(batch.obs, batch.actions)
        td_error = target - q
        return (batch.weights * td_error.pow(2)).mean(dim=1).sum(), q, td_error

    @property
    def parallel_losses(self) -> bool:
        """Whether an update's critic and policy halves run on two threads (see the config field);
        never on CUDA (its ops queue asynchronously anyway) nor beside torch's own intra-op threads."""
        return (self.config.parallel_losses and self.device.type == "cpu"
                and torch.get_num_threads() == 1)

    def within_bounds(self, actions: np.ndarray) -> np.ndarray:
        """tanh(u) * scale + centre can land a rounding error outside the bounds; noise more."""
        return np.clip(actions, self.spec.action_low, self.spec.action_high).astype(np.float32, copy=False)


def both(first: Callable[[], None], second: Callable[[], None], parallel: bool) -> None:
    """``first()`` and ``second()``; with ``parallel``, ``first`` in a new thread meanwhile (torch
    releases the GIL inside its ops, so two CPU cores work on one update). A new thread per call,
    joined before returning: ~0.1 ms, and nothing left running between updates. An error in
    either is raised here."""
    if not parallel:
        first()
        second()
        return
    failed: list[BaseException] = []

    def run_first() -> None:
        try:
            first()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failed.append(exc)

    thread = threading.Thread(target=run_first, name="asyncrl-critic-half", daemon=True)
    thread.start()
    try:
        second()
    finally:
        thread.join()
    if failed:
        raise failed[0]
