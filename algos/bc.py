"""Behaviour cloning: a policy network fitted to a dataset's actions. Discrete actions: the
cross-entropy of the network's logits with the action taken; continuous actions: the squared
error of its (tanh-squashed, scaled to the action range) action. It learns from a dataset only
(``python -m asyncrl run bc --dataset ID``)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from algos.nets import Widths, obs_torso
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, Metrics, TransitionBatch, TransitionData


class BCConfig(ConfigModel):
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    hidden: Widths = Field([256, 256], description="MLP torso widths (vector observations).")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient-norm clip.")


class PolicyNetwork(nn.Module):
    """Logits over the actions (discrete), or an action within the env's range (continuous)."""

    def __init__(self, spec: EnvSpec, hidden: list[int]):
        super().__init__()
        self.torso, features, self.pixels = obs_torso(spec.obs_shape, hidden)
        self.discrete = spec.action_kind == "discrete"
        self.head = nn.Linear(features, spec.num_actions if self.discrete else math.prod(spec.action_shape))
        if not self.discrete:
            low, high = (torch.as_tensor(np.asarray(v, np.float32)) for v in (spec.action_low, spec.action_high))
            self.register_buffer("centre", (high + low) / 2)
            self.register_buffer("half_range", (high - low) / 2)
        with torch.no_grad():  # materialise lazy layers: the weight store's size is fixed
            self(torch.from_numpy(np.zeros((1, *spec.obs_shape), spec.obs_dtype)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.head(self.torso(obs if self.pixels else obs.float().flatten(1)))
        return out if self.discrete else self.centre + self.half_range * torch.tanh(out)


class BC:
    Config: ClassVar[type[BaseModel]] = BCConfig
    needs_dataset: ClassVar[bool] = True
    # CartPole-v1 from a dataset (python -m asyncrl record); steps are updates in an offline run.
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "bc"},
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "learner": {"batch_size": 256},
        "train": {"total_env_steps": 5_000, "eval_every": 1_000, "eval_episodes": 20,
                  "log_every": 500, "checkpoint_every": 1_000, "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: BCConfig, device: torch.device):
        self.spec, self.config, self.device = spec, config, device
        self.policy = PolicyNetwork(spec, config.hidden).to(device)
        self._params = list(self.policy.parameters())
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr)
        self.updates = 0

    @property
    def data(self) -> TransitionData:
        return TransitionData(n_step=1, gamma=0.99)  # only (observation, action) pairs are used

    @property
    def acting_network(self) -> nn.Module:
        return self.policy

    def make_acting_network(self) -> nn.Module:
        return PolicyNetwork(self.spec, self.config.hidden)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int,
            rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        out = network(obs)
        return (out.argmax(dim=1) if self.spec.action_kind == "discrete" else out).cpu().numpy()

    def loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, Metrics]:
        out = self.policy(batch.obs)
        if self.spec.action_kind == "discrete":
            actions = batch.actions.long()
            per_item = F.cross_entropy(out, actions, reduction="none")
            metrics = {"accuracy": (out.argmax(dim=1) == actions).float().mean()}
        else:
            per_item = (out - batch.actions.float()).pow(2).flatten(1).sum(1)
            metrics = {}
        loss = (batch.weights * per_item).mean()
        return loss, {"bc_loss": loss.detach(), **metrics}

    def update(self, batch: TransitionBatch) -> tuple[Metrics, None]:
        loss, metrics = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(self._params, self.config.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.updates += 1
        return metrics, None

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
