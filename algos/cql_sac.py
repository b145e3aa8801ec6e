"""Conservative Q-learning for continuous actions (Kumar et al. 2020, CQL(H) with a fixed weight):
SAC's networks and update, with the critics' loss raised by ``cql_alpha`` times the gap between a
soft maximum of Q over sampled actions and Q of the action the data took. No maximum over a
continuous action space exists in closed form, so the soft maximum is a logsumexp over
``num_sampled_actions`` uniform actions and as many policy actions at the observation and at the
next one (all scored at the observation), each divided by the density it was drawn from
(importance sampling, as in the paper's code, CORL and d3rlpy). It keeps Q low on actions the data
never shows, so the policy, which climbs Q, stays near the data. For offline runs
(``run cql_sac --dataset ID``); the discrete variant is ``cql`` (algos/cql.py).

The policy and temperature losses are SAC's, and so is the update: one optimizer step."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from algos.sac import SAC, SACConfig
from asyncrl.core import EnvSpec, Metrics, TransitionBatch


class CQLSACConfig(SACConfig):
    cql_alpha: float = Field(
        5.0, ge=0, description="Weight of the conservative term. 5.0: the fixed weight of Kumar et al. "
        "2020 on the Gym MuJoCo tasks (d3rlpy's default too; CORL's CQL class defaults to 5, its "
        "training config to 10). 0: SAC's update exactly.")
    num_sampled_actions: int = Field(
        10, ge=1, description="Actions per observation from each of the three proposals (uniform, "
        "the policy at the observation, the policy at the next one) in the logsumexp (the paper's 10).")
    parallel_losses: bool = Field(
        False, description="As SAC's (the critic half in a second thread), off by default here: the "
        "sampled actions make the critic half ~10x the policy half, so a second thread saves little, "
        "and on a busy CPU waiting for it costs more than that.")


class CQLSAC(SAC):
    Config: ClassVar[type[BaseModel]] = CQLSACConfig
    # Pendulum-v1 from a dataset (python -m asyncrl record); steps are updates in an offline run.
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "cql_sac", "cql_alpha": 5.0, "num_sampled_actions": 10, "hidden": [64, 64],
                 "actor_lr": 1e-3, "critic_lr": 1e-3, "alpha_lr": 1e-3},
        "env": {"id": "Pendulum-v1", "num_envs": 4},
        "learner": {"batch_size": 256},
        "train": {"total_env_steps": 10_000, "eval_every": 1_000, "eval_episodes": 10,
                  "log_every": 500, "checkpoint_every": 5_000, "target_return": -200.0},
    }

    def __init__(self, spec: EnvSpec, config: CQLSACConfig, device: torch.device):
        super().__init__(spec, config, device)
        low, high = (torch.as_tensor(v, dtype=torch.float32, device=device)
                     for v in (spec.action_low, spec.action_high))
        self._low, self._range = low, high - low
        self._uniform_log_density = -float(torch.log(self._range).sum())
        self._gap: torch.Tensor | None = None  # the last critic loss's, for the update's metrics

    @torch.no_grad()
    def sampled_actions(self, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, 3 * num_sampled_actions, *action_shape)`` actions to score at ``batch.obs``
        (uniform ones, then the policy's at the observation, then at the next observation) and
        the log-density each was drawn from, ``(batch, 3 * num_sampled_actions)``. Without
        gradient: the conservative term trains the critics alone."""
        n, size = self.config.num_sampled_actions, len(batch.obs)
        uniform = self._low + self._range * torch.rand((size, n, *self._range.shape), device=self.device)
        proposals, log_densities = [uniform], [torch.full((size, n), self._uniform_log_density, device=self.device)]
        for obs in (batch.obs, batch.next_obs):
            action, log_prob = self.actor.sample(obs.repeat_interleave(n, dim=0))
            proposals.append(action.view(size, n, *action.shape[1:]))
            log_densities.append(log_prob.view(size, n))
        return torch.cat(proposals, dim=1), torch.cat(log_densities, dim=1)

    def conservative_gap(self, batch: TransitionBatch, q_data: torch.Tensor) -> torch.Tensor:
        """Each critic's ``logsumexp_a (Q(s, a) - log density(a)) - Q(s, data action)`` over the
        sampled actions, ``(2, batch)``; ``q_data``: the critics' values of the data's actions."""
        actions, log_density = self.sampled_actions(batch)
        size, samples = log_density.shape
        obs = batch.obs.float().flatten(1)
        q = self.critic(obs.repeat_interleave(samples, dim=0), actions.flatten(0, 1)).view(2, size, samples)
        return torch.logsumexp(q - log_density, dim=-1) - q_data

    def critic_loss(self, batch: TransitionBatch, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAC's TD loss plus ``cql_alpha`` times the conservative gap (averaged over the batch,
        summed over the twins as the TD loss is). Its random draws come after SAC's policy noise,
        which SAC's update draws first, so a seed repeats in either thread layout; with
        ``cql_alpha`` 0 it draws nothing and is SAC's loss exactly."""
        loss, q, td_error = super().critic_loss(batch, noise)
        if self.config.cql_alpha == 0:
            self._gap = None
            return loss, q, td_error
        gap = (batch.weights * self.conservative_gap(batch, q)).mean(dim=1)
        self._gap = gap.detach().mean()
        return loss + self.config.cql_alpha * gap.sum(), q, td_error

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        metrics, priorities = super().update(batch)
        if self._gap is not None:
            metrics["cql_gap"] = self._gap
        return metrics, priorities
