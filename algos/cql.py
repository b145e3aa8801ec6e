"""Conservative Q-learning, discrete (Kumar et al. 2020, CQL(H)): DQN's TD loss plus ``alpha``
times the gap between a soft maximum of Q over every action (logsumexp) and Q of the action the
data took, which keeps Q low on actions the data never shows. On DQN's network and update; for
offline runs (``run cql --dataset ID``), and online as plain conservative DQN (fine-tuning a
resumed offline run with actors). For continuous actions, ``cql_sac`` (algos/cql_sac.py) is CQL
on SAC's networks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, field_validator

from algos.dqn import DQN, DQNConfig, td_loss
from asyncrl.core import EnvSpec, Metrics, TransitionBatch


class CQLConfig(DQNConfig):
    alpha: float = Field(1.0, ge=0, description="Weight of the conservative term (the paper's "
                         "discrete default, 1.0).")
    compile: bool = Field(False, description="Not offered for CQL (the compiled update is DQN's TD loss alone).")

    @field_validator("compile")
    @classmethod
    def _eager_only(cls, value: bool) -> bool:
        if value:
            raise ValueError("CQL's update runs eagerly: leave compile false")
        return value


class CQL(DQN):
    Config: ClassVar[type[BaseModel]] = CQLConfig
    # CartPole-v1 from a dataset (python -m asyncrl record); steps are updates in an offline run.
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "cql", "lr": 1e-3, "n_step": 3, "target_update_period": 100},
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "learner": {"batch_size": 256},
        "train": {"total_env_steps": 20_000, "eval_every": 2_000, "eval_episodes": 20,
                  "log_every": 1_000, "checkpoint_every": 5_000, "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: CQLConfig, device: torch.device):
        if spec.action_kind != "discrete":  # before DQN's refusal, which would not name cql_sac
            raise ValueError("its actions are continuous: run cql_sac, CQL on SAC's networks")
        super().__init__(spec, config, device)

    def loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
        c = self.config
        q_all = self.q(batch.obs)  # once: the TD loss and the gap share it (and its backward pass)

        def q(obs: torch.Tensor) -> torch.Tensor:
            return q_all if obs is batch.obs else self.q(obs)

        loss, metrics, priorities = td_loss(batch, q, self.target_q, c.double, c.huber_delta)
        taken = q_all.gather(1, batch.actions.long().unsqueeze(1)).squeeze(1)
        gap = (batch.weights * (torch.logsumexp(q_all, dim=1) - taken)).mean()
        metrics["cql_gap"] = gap.detach()
        return loss + c.alpha * gap, metrics, priorities
