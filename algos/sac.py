"""Soft Actor-Critic (Haarnoja et al. 2018, the version with twin critics and a learned entropy
temperature): a tanh-squashed Gaussian policy scaled to the env's action bounds, twin Q critics
with Polyak-averaged targets, and uniform random actions for a warm-up.

One update computes the critic, policy and temperature losses from the same parameters and
applies them in one optimizer step (as Acme's SAC learner does); the policy loss reads the critics
through detached weights, so it trains the policy alone. With ``compile`` the same update is one
function of tensors (algos/functional.py), compiled."""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call, grad

from algos.continuous import (ContinuousActorCritic, ContinuousConfig, both, critic_template,
                              pendulum_preset, squared_td_loss, views)
from algos.functional import CompiledStep, adam_, adam_state, rng_neutral_template
from algos.nets import TwinCritic, action_bounds, mlp
from asyncrl.core import EnvSpec, Metrics, TransitionBatch

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class SACConfig(ContinuousConfig):
    alpha_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the log entropy temperature.")
    target_update_period: int = Field(1, ge=1, description="Updates between target-critic updates.")
    init_alpha: float = Field(1.0, gt=0, description="Entropy temperature at the start.")
    autotune_alpha: bool = Field(
        True, description="Learn the temperature so that the policy's entropy tracks target_entropy.")
    target_entropy: float | None = Field(
        None, description="Entropy the temperature aims at; None: minus the action dimension.")


# --- networks ---------------------------------------------------------------------------------


class SquashedGaussianPolicy(nn.Module):
    """obs -> a Gaussian over pre-squash actions; tanh, then scaled to the action bounds."""

    def __init__(self, spec: EnvSpec, hidden: list[int]):
        super().__init__()
        action_dim = int(np.prod(spec.action_shape))
        self.torso = mlp(int(np.prod(spec.obs_shape)), hidden)
        self.head = nn.Linear(hidden[-1], 2 * action_dim)
        scale, centre = action_bounds(spec)
        # Buffers, not parameters: fixed by the spec, so the weight store need not carry them.
        self.register_buffer("scale", scale)
        self.register_buffer("centre", centre)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of the pre-squash Gaussian."""
        mean, raw = self.head(self.torso(obs.float().flatten(1))).chunk(2, dim=-1)
        # A smooth squash into [LOG_STD_MIN, LOG_STD_MAX] rather than a clamp: gradients survive.
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1)
        return mean, log_std

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0]) * self.scale + self.centre

    def sample(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action within bounds and its log-density (of the scaled action)."""
        mean, log_std = self(obs)
        if noise is None:
            noise = torch.randn_like(mean)
        return squashed_sample(mean, log_std, noise, self.scale, self.centre)


def squashed_sample(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor,
                    scale: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The action within bounds at the standard-normal draw ``noise``, and its log-density."""
    pre_squash = mean + log_std.exp() * noise
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    # Change of variables: log|d action / d pre_squash| = log(scale) + log(1 - tanh(u)^2),
    # the latter written in a form that stays finite for large |u|.
    log_det = torch.log(scale) + 2 * (math.log(2) - pre_squash - F.softplus(-2 * pre_squash))
    action = torch.tanh(pre_squash) * scale + centre
    return action, (gaussian - log_det).sum(-1)


def temperature_loss_of(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float
                        ) -> torch.Tensor:
    """The temperature's loss at (detached) log-probs: it rises while the entropy is too low."""
    return -(log_alpha * (log_prob + target_entropy)).mean()


def target_entropy_of(spec: EnvSpec, config: SACConfig) -> float:
    return -float(np.prod(spec.action_shape)) if config.target_entropy is None else config.target_entropy


def _functional_update(spec: EnvSpec, config: SACConfig) -> Callable:
    """SAC's whole update as one function of tensors (see algos/functional.py): the critic target,
    the three losses' gradients through torch.func (the same detaches as the eager update), Adam
    per parameter group without clipping (the eager update clips nothing) and, with a target
    update every update, the Polyak step. The policy noise comes in: drawn as the eager update
    draws it, so a seed repeats either way."""
    actor = rng_neutral_template(("sac-actor", spec.obs_shape, spec.action_shape, tuple(config.hidden)),
                                 lambda: SquashedGaussianPolicy(spec, config.hidden))
    critic = critic_template(spec, config.hidden)
    actor_names = [name for name, _ in actor.named_parameters()]
    critic_names = [name for name, _ in critic.named_parameters()]
    autotune, target_entropy = config.autotune_alpha, target_entropy_of(spec, config)
    actor_lr, critic_lr, alpha_lr, tau = config.actor_lr, config.critic_lr, config.alpha_lr, config.tau
    polyak = config.target_update_period == 1  # else the caller's, eagerly, every period

    def update(actor_ps: list[torch.Tensor], critic_ps: list[torch.Tensor],
               target_ps: list[torch.Tensor], log_alpha: torch.Tensor, scale: torch.Tensor,
               centre: torch.Tensor, batch: TransitionBatch, next_noise: torch.Tensor,
               noise: torch.Tensor, state: tuple[tuple[list[torch.Tensor], ...], ...]):
        def policy(ps: list[torch.Tensor], obs: torch.Tensor, draw: torch.Tensor):
            mean, log_std = functional_call(actor, dict(zip(actor_names, ps)), (obs,))
            return squashed_sample(mean, log_std, draw, scale, centre)

        def q_of(ps: list[torch.Tensor], obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
            return functional_call(critic, dict(zip(critic_names, ps)), (obs, action))

        alpha = log_alpha.exp()  # the temperature before the step
        next_action, next_log_prob = policy(actor_ps, batch.next_obs, next_noise)
        next_q = q_of(target_ps, batch.next_obs, next_action).min(dim=0).values
        target = batch.rewards + batch.discounts * (next_q - alpha * next_log_prob)

        def losses(a_ps: list[torch.Tensor], c_ps: list[torch.Tensor], *trained_log_alpha: torch.Tensor):
            q = q_of(c_ps, batch.obs, batch.actions)
            critic_loss, td_error = squared_td_loss(q, target, batch.weights)
            action, log_prob = policy(a_ps, batch.obs, noise)
            q_policy = q_of(critic_ps, batch.obs, action).min(dim=0).values  # untraced: frozen
            actor_loss = (alpha * log_prob - q_policy).mean()
            total = critic_loss + actor_loss
            if trained_log_alpha:
                total = total + temperature_loss_of(trained_log_alpha[0], log_prob.detach(), target_entropy)
            metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "alpha": alpha,
                       "entropy": -log_prob.mean(), "q_values": q.mean()}
            return total, (metrics, td_error.abs().mean(dim=0))

        trained = (actor_ps, critic_ps, log_alpha) if autotune else (actor_ps, critic_ps)
        grads, (metrics, priorities) = grad(losses, argnums=tuple(range(len(trained))),
                                            has_aux=True)(*trained)
        adam_(actor_ps, grads[0], state[0], actor_lr)
        adam_(critic_ps, grads[1], state[1], critic_lr)
        if autotune:
            adam_([log_alpha], [grads[2]], state[2], alpha_lr)
        if polyak:
            torch._foreach_lerp_(target_ps, critic_ps, tau)
        return metrics, priorities

    return update


# --- the algorithm ----------------------------------------------------------------------------


class SAC(ContinuousActorCritic):
    Config: ClassVar[type[BaseModel]] = SACConfig
    preset: ClassVar[dict[str, Any]] = pendulum_preset("sac", alpha_lr=1e-3)

    def __init__(self, spec: EnvSpec, config: SACConfig, device: torch.device):
        self.spec, self.config, self.device = spec, config, device
        self.actor = SquashedGaussianPolicy(spec, config.hidden).to(device)  # refuses discrete specs
        self.critic = TwinCritic(spec, config.hidden).to(device)
        self.target_critic = TwinCritic(spec, config.hidden).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=device,
                                      requires_grad=config.autotune_alpha)
        self.target_entropy = target_entropy_of(spec, config)
        groups = [{"params": list(self.actor.parameters()), "lr": config.actor_lr},
                  {"params": list(self.critic.parameters()), "lr": config.critic_lr}]
        if config.autotune_alpha:
            groups.append({"params": [self.log_alpha], "lr": config.alpha_lr})
        # One fused Adam over every parameter: one step per update, few kernel launches.
        self.optimizer = torch.optim.Adam(groups, fused=True)
        self._targets = list(self.target_critic.parameters())
        self._onlines = list(self.critic.parameters())
        self.updates = 0
        self._compiled = None
        if config.compile:
            self._compile()

    def _compile(self) -> None:
        """The compiled update (algos/functional.py): the forward passes, the losses, their
        gradients, Adam on the optimizer's own state and the Polyak step in one graph."""
        overridden = [name for name in ("critic_target", "critic_loss", "policy_loss", "temperature_loss")
                      if getattr(type(self), name) is not getattr(SAC, name)]
        if overridden:
            raise ValueError(f"algo.compile compiles SAC's own losses, and {type(self).__name__} "
                             f"changes {', '.join(overridden)}: set algo.compile = false")
        self._compiled = CompiledStep(_functional_update(self.spec, self.config), "SAC")
        self._actor_views, self._critic_views = views(self.actor), views(self.critic)
        self._target_views = views(self.target_critic)
        self._log_alpha_view = self.log_alpha.detach()
        self._init_adam_state()

    def _init_adam_state(self) -> None:
        groups = [list(self.actor.parameters()), list(self.critic.parameters())]
        if self.config.autotune_alpha:
            groups.append([self.log_alpha])
        self._adam_state = tuple(adam_state(self.optimizer, params) for params in groups)

    def make_acting_network(self) -> nn.Module:
        return SquashedGaussianPolicy(self.spec, self.config.hidden)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int,
            rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        random = self.warm_up(obs, env_steps, rng, greedy)
        if random is not None:
            return random
        if greedy:
            actions = network.greedy(obs).cpu().numpy()
        else:  # the actor's own generator draws the noise: serial runs repeat exactly
            noise = torch.from_numpy(rng.standard_normal((len(obs), *self.spec.action_shape), np.float32))
            actions = network.sample(obs, noise.to(obs.device))[0].cpu().numpy()
        return self.within_bounds(actions)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    @torch.no_grad()
    def critic_target(self, batch: TransitionBatch, noise: torch.Tensor | None = None) -> torch.Tensor:
        """r + discount * (min of the target critics - alpha * log-prob) at a fresh policy action
        (``noise``: the policy's standard-normal draw, else a new one)."""
        next_action, next_log_prob = self.actor.sample(batch.next_obs, noise)
        next_q = self.target_critic(batch.next_obs, next_action).min(dim=0).values
        return batch.rewards + batch.discounts * (next_q - self.alpha * next_log_prob)

    def critic_loss(self, batch: TransitionBatch, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the twin critics' squared TD loss, their values, the TD errors), both ``(2, batch)``."""
        return self.td_loss(self.critic_target(batch, noise), batch)

    def policy_loss(self, obs: torch.Tensor, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy loss, log-probs). The critics are read through detached weights: the policy
        loss trains the policy alone."""
        action, log_prob = self.actor.sample(obs, noise)
        q_policy = self.critic(obs, action, frozen=True).min(dim=0).values
        return (self.alpha * log_prob - q_policy).mean(), log_prob

    def temperature_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        if not self.config.autotune_alpha:
            return torch.zeros((), device=self.device)
        return temperature_loss_of(self.log_alpha, log_prob.detach(), self.target_entropy)

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        """The critic, policy and temperature gradients, then one optimizer step. The losses
        train disjoint parameters (the targets are computed without gradient, the policy loss
        reads the critics detached, the temperature's the log-probs), so the critic's half and
        the policy's half may run on two threads with the same results; the policy noise is
        drawn here first, in one order, so that a seed repeats either way."""
        shape = (len(batch.obs), *self.spec.action_shape)
        next_noise = torch.randn(shape, device=self.device)
        noise = torch.randn(shape, device=self.device)
        stepped = None if self._compiled is None else self._compiled(
            self._actor_views, self._critic_views, self._target_views, self._log_alpha_view,
            self.actor.scale, self.actor.centre, batch, next_noise, noise, self._adam_state)
        if stepped is not None:
            metrics, priorities = stepped
            self.updates += 1
            if self.config.target_update_period > 1 and self.updates % self.config.target_update_period == 0:
                with torch.no_grad():  # else the compiled update did it
                    torch._foreach_lerp_(self._targets, self._onlines, self.config.tau)
            return metrics, priorities
        alpha = self.alpha  # the temperature the losses use, before the step moves it
        self.optimizer.zero_grad(set_to_none=True)
        out: dict[str, torch.Tensor] = {}

        def critic_half() -> None:
            out["critic_loss"], out["q"], out["td_error"] = self.critic_loss(batch, next_noise)
            out["critic_loss"].backward()

        def policy_half() -> None:
            out["actor_loss"], out["log_prob"] = self.policy_loss(batch.obs, noise)
            (out["actor_loss"] + self.temperature_loss(out["log_prob"])).backward()

        both(critic_half, policy_half, self.parallel_losses)
        self.optimizer.step()
        metrics = {"critic_loss": out["critic_loss"].detach(), "actor_loss": out["actor_loss"].detach(),
                   "alpha": alpha, "entropy": -out["log_prob"].detach().mean(),
                   "q_values": out["q"].detach().mean()}
        priorities = out["td_error"].detach().abs().mean(dim=0)
        self.updates += 1
        if self.updates % self.config.target_update_period == 0:
            with torch.no_grad():
                torch._foreach_lerp_(self._targets, self._onlines, self.config.tau)
        return metrics, priorities

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(state["optimizer"])  # new state tensors: list them again
        self.updates = int(state["updates"])
        if self._compiled is not None:
            self._init_adam_state()
