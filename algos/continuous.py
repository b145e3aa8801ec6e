"""What SAC and TD3 share: the config fields of an off-policy actor-critic for continuous actions,
the Pendulum-v1 preset they train on out of the box, and acting's warm-up and bounds."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from algos.functional import rng_neutral_template
from algos.nets import TwinCritic, Widths
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
    compile: bool = Field(
        False,
        description="torch.compile the update (the critic, policy and temperature losses, their "
        "gradients, Adam, the target networks' Polyak step): more updates/s for small networks on a "
        "CPU, for seconds of compiling at the first update (falls back to eager, with a warning, "
        "where compiling fails). It wins over parallel_losses, which then applies only to that "
        "eager fallback.")


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
        loss, td_error = squared_td_loss(q, target, batch.weights)
        return loss, q, td_error

    @property
    def parallel_losses(self) -> bool:
        """Whether an update's critic and policy halves run on two threads (see the config field);
        never on CUDA (its ops queue asynchronously anyway) nor beside torch's own intra-op threads,
        nor while the update is compiled (one graph; compile wins)."""
        compiled = getattr(self, "_compiled", None)
        return (self.config.parallel_losses and self.device.type == "cpu"
                and torch.get_num_threads() == 1 and not (compiled is not None and compiled.active))

    def within_bounds(self, actions: np.ndarray) -> np.ndarray:
        """tanh(u) * scale + centre can land a rounding error outside the bounds; noise more."""
        return np.clip(actions, self.spec.action_low, self.spec.action_high).astype(np.float32, copy=False)


def squared_td_loss(q: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the twin critics' importance-weighted squared TD loss, summed over the twins, and the TD
    errors ``target - q``), for values ``q`` of shape ``(2, batch)``."""
    td_error = target - q
    return (weights * td_error.pow(2)).mean(dim=1).sum(), td_error


def critic_template(spec: EnvSpec, hidden: list[int]) -> nn.Module:
    """The twin critics' structure (a template), for a compiled update."""
    return rng_neutral_template(("twin-critic", spec.obs_shape, spec.action_shape, tuple(hidden)),
                                lambda: TwinCritic(spec, hidden))


def views(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters, detached: they share its storage, so a compiled update's in-place
    Adam step moves the module itself."""
    return [p.detach() for p in module.parameters()]


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
