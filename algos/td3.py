"""TD3 (Fujimoto et al. 2018): a deterministic tanh policy scaled to the env's action bounds,
twin critics whose minimum is the bootstrap target, target policy smoothing (clipped Gaussian
noise on the target action), and a delayed policy: the policy and both targets move only every
``policy_delay`` critic updates. Gaussian exploration noise, uniform random actions for a warm-up.

On a policy update the critic and policy losses are taken from the same parameters and applied in
one optimizer step; the policy loss reads the critic through detached weights, so it trains the
policy alone. Between policy updates the policy has no gradient and Adam leaves it untouched."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from algos.continuous import ContinuousActorCritic, ContinuousConfig, both, pendulum_preset
from algos.nets import TwinCritic, action_bounds, mlp
from asyncrl.core import EnvSpec, Metrics, TransitionBatch


class TD3Config(ContinuousConfig):
    policy_delay: int = Field(
        2, ge=1, description="Critic updates per policy update (and per target-network update).")
    exploration_noise: float = Field(
        0.1, ge=0, description="Std of the Gaussian acting noise, as a fraction of the action half-range.")
    target_noise: float = Field(
        0.2, ge=0, description="Std of the target policy smoothing noise, as a fraction of the half-range.")
    target_noise_clip: float = Field(
        0.5, ge=0, description="The smoothing noise is clipped to +- this fraction of the half-range.")


# --- networks (the critic is nets.TwinCritic) ---------------------------------------------------


class DeterministicPolicy(nn.Module):
    """obs -> tanh, scaled to the action bounds."""

    def __init__(self, spec: EnvSpec, hidden: list[int]):
        super().__init__()
        self.torso = mlp(int(np.prod(spec.obs_shape)), hidden)
        self.head = nn.Linear(hidden[-1], int(np.prod(spec.action_shape)))
        scale, centre = action_bounds(spec)
        # Buffers, not parameters: fixed by the spec, so the weight store need not carry them.
        self.register_buffer("scale", scale)
        self.register_buffer("centre", centre)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.torso(obs.float().flatten(1)))) * self.scale + self.centre


# --- the algorithm ----------------------------------------------------------------------------


class TD3(ContinuousActorCritic):
    Config: ClassVar[type[BaseModel]] = TD3Config
    preset: ClassVar[dict[str, Any]] = pendulum_preset("td3")

    def __init__(self, spec: EnvSpec, config: TD3Config, device: torch.device):
        self.spec, self.config, self.device = spec, config, device
        self.actor = DeterministicPolicy(spec, config.hidden).to(device)  # refuses discrete specs
        self.target_actor = DeterministicPolicy(spec, config.hidden).to(device)
        self.critic = TwinCritic(spec, config.hidden).to(device)
        self.target_critic = TwinCritic(spec, config.hidden).to(device)
        for target, online in ((self.target_actor, self.actor), (self.target_critic, self.critic)):
            target.load_state_dict(online.state_dict())
            target.requires_grad_(False)
        # One fused Adam over both networks: one step per update, few kernel launches.
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.actor.parameters()), "lr": config.actor_lr},
             {"params": list(self.critic.parameters()), "lr": config.critic_lr}], fused=True)
        self._targets = [*self.target_actor.parameters(), *self.target_critic.parameters()]
        self._onlines = [*self.actor.parameters(), *self.critic.parameters()]
        self.updates = 0
        self._actor_loss = torch.zeros((), device=device)  # the last one, logged between policy steps

    def make_acting_network(self) -> nn.Module:
        return DeterministicPolicy(self.spec, self.config.hidden)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int,
            rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        random = self.warm_up(obs, env_steps, rng, greedy)
        if random is not None:
            return random
        actions = network(obs).cpu().numpy()
        if not greedy:
            half_range = (self.spec.action_high - self.spec.action_low) / 2
            noise = rng.standard_normal((len(obs), *self.spec.action_shape))
            actions = actions + noise * self.config.exploration_noise * half_range
        return self.within_bounds(actions)

    def smoothed_target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        """The target policy's action plus clipped Gaussian noise, within the bounds."""
        c, scale = self.config, self.target_actor.scale
        action = self.target_actor(next_obs)
        noise = (torch.randn_like(action) * c.target_noise).clamp(-c.target_noise_clip, c.target_noise_clip)
        low, high = self.target_actor.centre - scale, self.target_actor.centre + scale
        return torch.max(torch.min(action + noise * scale, high), low)

    @torch.no_grad()
    def critic_target(self, batch: TransitionBatch) -> torch.Tensor:
        """r + discount * min of the target critics at the smoothed target action."""
        next_q = self.target_critic(batch.next_obs, self.smoothed_target_action(batch.next_obs))
        return batch.rewards + batch.discounts * next_q.min(dim=0).values

    def policy_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """Minus the first critic at the policy's action, as in the paper. The critic is read
        through detached weights: the policy loss trains the policy alone."""
        return -self.critic(obs, self.actor(obs), frozen=True)[0].mean()

    def critic_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the twin critics' squared TD loss, their values, the TD errors), both ``(2, batch)``."""
        return self.td_loss(self.critic_target(batch), batch)

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        """The critic gradient every update, the policy's every ``policy_delay``, then one
        optimizer step. The two train disjoint parameters (the target is computed without
        gradient, the policy loss reads the critics detached), so on a policy step the halves
        may run on two threads with the same results (only the critic's half draws noise)."""
        self.updates += 1
        policy_step = self.updates % self.config.policy_delay == 0
        self.optimizer.zero_grad(set_to_none=True)  # the policy's gradients stay None between its steps
        out: dict[str, torch.Tensor] = {}

        def critic_half() -> None:
            out["critic_loss"], out["q"], out["td_error"] = self.critic_loss(batch)
            out["critic_loss"].backward()

        def policy_half() -> None:
            actor_loss = self.policy_loss(batch.obs)
            actor_loss.backward()
            self._actor_loss = actor_loss.detach()

        if policy_step:
            both(critic_half, policy_half, self.parallel_losses)
        else:
            critic_half()
        self.optimizer.step()
        if policy_step:
            with torch.no_grad():
                torch._foreach_lerp_(self._targets, self._onlines, self.config.tau)
        metrics = {"critic_loss": out["critic_loss"].detach(), "actor_loss": self._actor_loss,
                   "q_values": out["q"].detach().mean()}
        return metrics, out["td_error"].detach().abs().mean(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "target_actor": self.target_actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("actor", "target_actor", "critic", "target_critic"):
            getattr(self, name).load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
