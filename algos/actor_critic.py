"""What PPO and IMPALA share: an actor-critic learner over one :class:`ActorCritic` network
(Adam with a linearly annealed learning rate, the state a checkpoint holds), the policy's
log-probabilities and entropy (categorical logits or a Gaussian mean), and acting by sampling
the policy with the actor's own generator.

Kept apart from ``ppo.py`` so that each algorithm's module holds only its own maths (PPO's
clipped surrogate, IMPALA's V-trace); both subclass :class:`ActorCriticLearner`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from algos.nets import ActorCritic
from asyncrl.core import EnvSpec


def log_prob_entropy(net: ActorCritic, params: torch.Tensor, actions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``actions`` and the entropy, from logits or a Gaussian mean."""
    return log_prob_entropy_of(net.log_std, params, actions)


def log_prob_entropy_of(log_std: torch.Tensor | None, params: torch.Tensor, actions: torch.Tensor,
                        with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`log_prob_entropy` given the Gaussian's ``log_std`` itself (None: ``params`` are
    categorical logits), as a functional step has it among its bound parameters."""
    if log_std is None:
        log_probs = torch.log_softmax(params, dim=-1)
        chosen = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return chosen, -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    log_std = log_std.expand_as(params)
    z = (actions - params) / log_std.exp()
    log_prob = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
    return log_prob, entropy


@torch.no_grad()
def sample_actions(net: ActorCritic, spec: EnvSpec, obs: torch.Tensor, rng: np.random.Generator,
                   greedy: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Actions from the policy with the actor's own generator, and their behaviour log-probs
    (continuous: also the unclipped sample, which the log-prob belongs to)."""
    params = net.policy(obs)
    if net.log_std is None:
        if greedy:
            choice = params.argmax(-1)
        else:  # Gumbel-max: a categorical sample from numpy's generator
            noise = torch.from_numpy(rng.gumbel(size=params.shape).astype(np.float32)).to(params.device)
            choice = (params + noise).argmax(-1)
        log_prob, _ = log_prob_entropy_of(net.log_std, params, choice, with_entropy=False)  # no entropy needed
        return choice.cpu().numpy(), {"log_prob": log_prob.cpu().numpy()}
    raw = params
    if not greedy:
        noise = torch.from_numpy(rng.standard_normal(params.shape).astype(np.float32)).to(params.device)
        raw = params + net.log_std.exp() * noise
    log_prob, _ = log_prob_entropy(net, params, raw)
    raw = raw.cpu().numpy()
    actions = np.clip(raw, spec.action_low, spec.action_high)
    return actions, {"log_prob": log_prob.cpu().numpy(), "raw_action": raw}


class ActorCriticLearner:
    """What PPO and IMPALA share: one :class:`ActorCritic` trained by one Adam whose learning
    rate anneals linearly to 0 over ``anneal_env_steps`` env steps learned from (0 or None:
    constant; a run resolves None to its budget before building the algorithm),
    acting by sampling the policy, and the state a checkpoint holds."""

    def __init__(self, spec: EnvSpec, config: Any, device: torch.device):
        self.spec, self.config, self.device = spec, config, device
        self.net = self.make_acting_network().to(device)
        self._params = list(self.net.parameters())
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr, eps=1e-5, fused=True)
        self.updates = 0
        self.env_steps = 0  # learned from: drives the learning-rate schedule

    @property
    def acting_network(self) -> nn.Module:
        return self.net

    def make_acting_network(self) -> ActorCritic:
        s = self.spec
        action_dim = s.action_shape[0] if s.action_kind == "continuous" else 0
        return ActorCritic(s.obs_shape, s.num_actions, action_dim, self.config.hidden,
                           self.config.init_log_std if action_dim else 0.0)

    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int, rng: np.random.Generator,
            greedy: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return sample_actions(network, self.spec, obs, rng, greedy)

    def learning_rate(self) -> float:
        c = self.config
        if not c.anneal_env_steps:
            return c.lr
        return c.lr * max(0.0, 1.0 - self.env_steps / c.anneal_env_steps)

    def learned_from(self, env_steps: int) -> None:
        """Count ``env_steps`` more transitions learnt from and set the annealed learning rate."""
        self.env_steps += env_steps
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates, "env_steps": self.env_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates, self.env_steps = int(state["updates"]), int(state["env_steps"])
