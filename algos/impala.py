"""IMPALA: an actor-critic learning from trajectories that actors produce without ever waiting
for the learner; V-trace corrects for the policy lag (the learner's weight version minus the
one that acted, logged as ``losses/policy_lag``) with importance weights clipped at rho-bar
(the value targets and policy gradient) and c-bar (how far corrections carry back in time).
Discrete actions; tanh MLPs for vectors, the Nature CNN for Atari frames.

Episode boundaries as in PPO (``algos/ppo.py``): rows that are EnvPool's reset step are masked;
nothing carries across an episode end; a truncated episode bootstraps from the value of its
final observation, a terminated one from 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from algos.nets import Widths
from algos.ppo import ActorCriticLearner, log_prob_entropy
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, Metrics, TrajectoryBatch, TrajectoryData


class IMPALAConfig(ConfigModel):
    lr: float = Field(6e-4, gt=0, description="Adam learning rate at the start.")
    anneal_env_steps: int | None = Field(
        None, ge=0, json_schema_extra={"run_default": "train.total_env_steps"},
        description="Env steps over which the learning rate decays linearly to 0; 0: constant. "
        "None: the run's train.total_env_steps.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    reward_scale: float = Field(
        1.0, gt=0, description="Rewards are multiplied by this in the value targets and advantages "
        "(the value head learns returns in these units): keeps the returns within what the critic "
        "can reach in the run's updates (Adam moves each weight by about lr per update).")
    trajectory_length: int = Field(20, ge=1, description="Steps per trajectory (T).")
    rho_bar: float = Field(1.0, gt=0, description="Clip of the importance weights in the value "
                           "targets and the policy gradient (rho-bar).")
    c_bar: float = Field(1.0, gt=0, description="Clip of the trace-cutting importance weights (c-bar).")
    value_coef: float = Field(0.5, ge=0, description="Weight of the value (baseline) loss.")
    entropy_coef: float = Field(0.01, ge=0, description="Weight of the entropy bonus.")
    normalize_advantages: bool = Field(
        False, description="Standardise the policy-gradient advantages over each batch's rows (as "
        "PPO does): the critic's common error leaves the gradient, and entropy_coef weighs against "
        "advantages of unit scale whatever the rewards' scale.")
    max_grad_norm: float = Field(40.0, gt=0, description="Gradient-norm clip.")
    hidden: Widths = Field([64, 64], description="MLP widths (vector observations).")


def vtrace(behaviour_log_probs: torch.Tensor, target_log_probs: torch.Tensor, rewards: torch.Tensor,
           values: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor, gamma: float,
           rho_bar: float, c_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace value targets ``vs`` and policy-gradient advantages, both ``[T, B]``, from
    ``values`` ``[T + 1, B]`` (the last row bootstraps). Espeholt et al. 2018, eq. (1) and
    section 4.2; corrections stop at episode ends."""
    ratios = (target_log_probs - behaviour_log_probs).exp()
    rhos = ratios.clamp(max=rho_bar)
    cs = ratios.clamp(max=c_bar)
    not_terminated = (~terminated).float()
    continues = (~(terminated | truncated)).float()
    next_values = values[1:] * not_terminated
    deltas = rhos * (rewards + gamma * next_values - values[:-1])
    corrections = torch.empty_like(deltas)
    carry = torch.zeros_like(deltas[0])
    for t in range(len(deltas) - 1, -1, -1):
        carry = deltas[t] + gamma * continues[t] * cs[t] * carry
        corrections[t] = carry
    vs = values[:-1] + corrections
    # The target of the next state: v_s+1 within an episode, the final observation's value at a
    # truncation, nothing at a termination.
    vs_next = torch.cat([vs[1:], values[-1:]])
    vs_next = torch.where(continues.bool(), vs_next, values[1:]) * not_terminated
    advantages = rhos * (rewards + gamma * vs_next - values[:-1])
    return vs, advantages


class IMPALA(ActorCriticLearner):
    Config: ClassVar[type[BaseModel]] = IMPALAConfig
    # CartPole-v1 out of the box; stops at a greedy evaluation of 475 (BENCHMARKS.md). Rewards
    # scaled by 0.1 as Sample Factory's CartPole example (--reward_scale=0.1) and advantages
    # normalised as its APPO default: with raw rewards the critic's output crawls towards
    # returns of up to 1 / (1 - gamma) = 100 (4 where the targets are 11 at 20k env steps),
    # and its lag and error swamp the advantages; 7 of 20 seeds then plateaued at ~150.
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "impala", "lr": 1e-3, "trajectory_length": 16, "gamma": 0.99,
                 "reward_scale": 0.1, "normalize_advantages": True, "entropy_coef": 0.01},
        "env": {"id": "CartPole-v1", "num_envs": 16},
        "learner": {"batch_size": 16},
        "train": {"total_env_steps": 300_000, "eval_every": 20_000, "eval_episodes": 20,
                  "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: IMPALAConfig, device: torch.device):
        if spec.action_kind != "discrete":
            raise ValueError(f"IMPALA here needs discrete actions; {spec.env_id} has continuous ones")
        super().__init__(spec, config, device)

    @property
    def data(self) -> TrajectoryData:
        return TrajectoryData(length=self.config.trajectory_length,
                              extras={"log_prob": ((), np.dtype(np.float32))}, wait_for_learner=False)

    def update(self, batch: TrajectoryBatch) -> tuple[Metrics, None]:
        c = self.config
        steps, envs = batch.rewards.shape
        logits, values = self.net(batch.obs.flatten(0, 1))
        logits = logits.view(steps + 1, envs, -1)[:-1]
        values = values.view(steps + 1, envs)
        log_probs, entropy = log_prob_entropy(self.net, logits, batch.actions)
        with torch.no_grad():
            vs, advantages = vtrace(batch.extras["log_prob"], log_probs, batch.rewards * c.reward_scale,
                                    values, batch.terminated, batch.truncated, c.gamma, c.rho_bar,
                                    c.c_bar)
        mask = batch.applied.float()
        count = mask.sum().clamp(min=1.0)
        # Before normalising: the mean is the critic's lag behind its targets, the spread mostly
        # its error (logged: what a plateau shows first).
        advantage_mean = (advantages * mask).sum() / count
        advantage_std = ((((advantages - advantage_mean) ** 2) * mask).sum()
                         / (count - 1).clamp(min=1.0)).sqrt()
        if c.normalize_advantages:
            advantages = (advantages - advantage_mean) / (advantage_std + 1e-8)
        policy_loss = -(advantages * log_probs * mask).sum() / count
        value_loss = 0.5 * (((vs - values[:-1]) ** 2) * mask).sum() / count
        entropy_mean = (entropy * mask).sum() / count
        loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy_mean

        self.learned_from(int(count.item()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self._params, c.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():
            clipped = ((log_probs - batch.extras["log_prob"]).exp() > c.rho_bar).float()
        return {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                "entropy": entropy_mean.detach(), "grad_norm": grad_norm,
                "rho_clip_fraction": (clipped * mask).sum() / count,
                "advantage_mean": advantage_mean, "advantage_std": advantage_std,
                "value_mean": (values[:-1].detach() * mask).sum() / count,
                "learning_rate": self.optimizer.param_groups[0]["lr"]}, None
