"""TD3 (Fujimoto et al. 2018): a deterministic tanh policy scaled to the env's action bounds,
twin critics whose minimum is the bootstrap target, target policy smoothing (clipped Gaussian
noise on the target action), and a delayed policy: the policy and both targets move only every
``policy_delay`` critic updates. Gaussian exploration noise, uniform random actions for a warm-up.

On a policy update the critic and policy losses are taken from the same parameters and applied in
one optimizer step; the policy loss reads the critic through detached weights, so it trains the
policy alone. Between policy updates the policy has no gradient and Adam leaves it untouched.
With ``compile`` the same update is one function of tensors (algos/functional.py), compiled: one
graph for the critic's steps, one for the policy's."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call, grad

from algos.continuous import (ContinuousActorCritic, ContinuousConfig, both, critic_template,
                              pendulum_preset, squared_td_loss, views)
from algos.functional import CompiledStep, adam_, adam_state, rng_neutral_template
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


def smoothed(action: torch.Tensor, draw: torch.Tensor, scale: torch.Tensor, centre: torch.Tensor,
             std: float, clip: float) -> torch.Tensor:
    """``action`` plus the standard-normal ``draw`` times ``std``, clipped to +- ``clip`` (both
    fractions of the half-range ``scale``), within the bounds."""
    noise = (draw * std).clamp(-clip, clip)
    low, high = centre - scale, centre + scale
    return torch.max(torch.min(action + noise * scale, high), low)


def _functional_update(spec: EnvSpec, config: TD3Config) -> Callable:
    """TD3's whole update as one function of tensors (see algos/functional.py): the critic target,
    the critic's gradient through torch.func and, when ``policy_step`` (a Python bool: one graph
    each way), the policy's from the same critic (read untraced, so frozen), then Adam per group
    without clipping (the eager update clips nothing) and the Polyak step of both targets. The
    smoothing noise comes in: drawn as the eager update draws it, so a seed repeats either way."""
    actor = rng_neutral_template(("td3-actor", spec.obs_shape, spec.action_shape, tuple(config.hidden)),
                                 lambda: DeterministicPolicy(spec, config.hidden))
    critic = critic_template(spec, config.hidden)
    actor_names = [name for name, _ in actor.named_parameters()]
    critic_names = [name for name, _ in critic.named_parameters()]
    std, clip, tau = config.target_noise, config.target_noise_clip, config.tau
    actor_lr, critic_lr = config.actor_lr, config.critic_lr

    def update(policy_step: bool, actor_ps: list[torch.Tensor], critic_ps: list[torch.Tensor],
               target_actor_ps: list[torch.Tensor], target_critic_ps: list[torch.Tensor],
               scale: torch.Tensor, centre: torch.Tensor, batch: TransitionBatch, draw: torch.Tensor,
               state: tuple[tuple[list[torch.Tensor], ...], ...]):
        def policy(ps: list[torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
            bound = {**dict(zip(actor_names, ps)), "scale": scale, "centre": centre}
            return functional_call(actor, bound, (obs,))

        def q_of(ps: list[torch.Tensor], obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
            return functional_call(critic, dict(zip(critic_names, ps)), (obs, action))

        next_action = smoothed(policy(target_actor_ps, batch.next_obs), draw, scale, centre, std, clip)
        next_q = q_of(target_critic_ps, batch.next_obs, next_action)
        target = batch.rewards + batch.discounts * next_q.min(dim=0).values

        def critic_loss(ps: list[torch.Tensor]):
            q = q_of(ps, batch.obs, batch.actions)
            loss, td_error = squared_td_loss(q, target, batch.weights)
            return loss, (loss, q.mean(), td_error.abs().mean(dim=0))

        def policy_loss(ps: list[torch.Tensor]):
            loss = -q_of(critic_ps, batch.obs, policy(ps, batch.obs))[0].mean()  # untraced: frozen
            return loss, loss

        critic_grads, (loss, q_mean, priorities) = grad(critic_loss, has_aux=True)(critic_ps)
        actor_loss = None
        if policy_step:  # from the critic before its step, as in the eager update
            actor_grads, actor_loss = grad(policy_loss, has_aux=True)(actor_ps)
            adam_(actor_ps, actor_grads, state[0], actor_lr)
        adam_(critic_ps, critic_grads, state[1], critic_lr)
        if policy_step:
            torch._foreach_lerp_([*target_actor_ps, *target_critic_ps], [*actor_ps, *critic_ps], tau)
        return loss, actor_loss, q_mean, priorities

    return update


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
        # Compiled (algos/functional.py): the forward passes, the losses, their gradients, Adam
        # on the optimizer's own state and the Polyak step in one graph per kind of step.
        self._compiled = CompiledStep(_functional_update(spec, config), "TD3") if config.compile else None
        if config.compile:
            self._views = [views(m) for m in (self.actor, self.critic, self.target_actor, self.target_critic)]
            self._init_adam_state()
        self._both_compiled = False  # the other kind of step's graph, compiled at the first one's

    @classmethod
    def _copies(cls, tensors: Any) -> Any:
        """Clones, in the same nesting, to compile the other kind of step on at the first update:
        its side effects land on them; its compiling stalls no later update, and its failure
        falls back to eager at once."""
        if isinstance(tensors, torch.Tensor):
            return tensors.clone()
        return type(tensors)(cls._copies(t) for t in tensors)

    def _init_adam_state(self) -> None:
        self._adam_state = tuple(adam_state(self.optimizer, list(m.parameters()))
                                 for m in (self.actor, self.critic))

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

    def smoothed_target_action(self, next_obs: torch.Tensor, draw: torch.Tensor | None = None
                               ) -> torch.Tensor:
        """The target policy's action plus clipped Gaussian noise, within the bounds (``draw``: the
        noise's standard-normal draw, else a new one)."""
        c = self.config
        action = self.target_actor(next_obs)
        return smoothed(action, torch.randn_like(action) if draw is None else draw, self.target_actor.scale,
                        self.target_actor.centre, c.target_noise, c.target_noise_clip)

    @torch.no_grad()
    def critic_target(self, batch: TransitionBatch, draw: torch.Tensor | None = None) -> torch.Tensor:
        """r + discount * min of the target critics at the smoothed target action."""
        next_q = self.target_critic(batch.next_obs, self.smoothed_target_action(batch.next_obs, draw))
        return batch.rewards + batch.discounts * next_q.min(dim=0).values

    def policy_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """Minus the first critic at the policy's action, as in the paper. The critic is read
        through detached weights: the policy loss trains the policy alone."""
        return -self.critic(obs, self.actor(obs), frozen=True)[0].mean()

    def critic_loss(self, batch: TransitionBatch, draw: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the twin critics' squared TD loss, their values, the TD errors), both ``(2, batch)``."""
        return self.td_loss(self.critic_target(batch, draw), batch)

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        """The critic gradient every update, the policy's every ``policy_delay``, then one
        optimizer step. The two train disjoint parameters (the target is computed without
        gradient, the policy loss reads the critics detached), so on a policy step the halves
        may run on two threads with the same results (only the critic's half draws noise)."""
        self.updates += 1
        policy_step = self.updates % self.config.policy_delay == 0
        draw = None  # the smoothing noise's standard-normal draw: the eager critic half's own
        if self._compiled is not None:
            draw = torch.randn((len(batch.obs), int(np.prod(self.spec.action_shape))), device=self.device)
            if not self._both_compiled and self.config.policy_delay > 1:
                self._both_compiled = True
                self._compiled(not policy_step, *self._copies(self._views), self.actor.scale,
                               self.actor.centre, batch, draw, self._copies(self._adam_state))
            stepped = self._compiled(policy_step, *self._views, self.actor.scale, self.actor.centre,
                                     batch, draw, self._adam_state)
            if stepped is not None:
                critic_loss, actor_loss, q_mean, priorities = stepped
                if actor_loss is not None:
                    self._actor_loss = actor_loss
                metrics = {"critic_loss": critic_loss, "actor_loss": self._actor_loss, "q_values": q_mean}
                return metrics, priorities
        self.optimizer.zero_grad(set_to_none=True)  # the policy's gradients stay None between its steps
        out: dict[str, torch.Tensor] = {}

        def critic_half() -> None:
            out["critic_loss"], out["q"], out["td_error"] = self.critic_loss(batch, draw)
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
        self.optimizer.load_state_dict(state["optimizer"])  # new state tensors: list them again
        self.updates = int(state["updates"])
        if self._compiled is not None:
            self._init_adam_state()
