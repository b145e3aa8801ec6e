"""PPO (clipped surrogate): GAE(lambda) advantages, normalised per minibatch, an optionally
clipped value loss, an entropy bonus, several epochs of minibatches over each rollout, a linearly
annealed learning rate and gradient-norm clipping. Discrete (categorical) and continuous
(Gaussian) actions; tanh MLPs for vectors, the Nature CNN for Atari frames.

Acting waits for the weights trained on each rollout (``TrajectoryData.wait_for_learner``), so
every rollout comes from the current policy (policy lag 0), as PPO assumes.

Episode boundaries (EnvPool's "next step" auto-reset): a row whose observation was an episode's
final one is not ``applied`` and is masked out; GAE never carries across an episode end; a
terminated episode bootstraps with 0, a truncated one with the value of its final observation.

What PPO shares with IMPALA (the learner base with its annealed Adam and checkpoint state, the
policy's log-probabilities and entropy, action sampling) lives in ``algos/actor_critic.py``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call, grad

from algos.actor_critic import ActorCriticLearner, log_prob_entropy, log_prob_entropy_of
from algos.functional import CompiledStep, adam_state, clip_and_adam_, template
from algos.nets import ActorCritic, Widths
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, Metrics, TrajectoryBatch, TrajectoryData


class PPOConfig(ConfigModel):
    lr: float = Field(2.5e-4, gt=0, description="Adam learning rate at the start.")
    anneal_env_steps: int | None = Field(
        None, ge=0, json_schema_extra={"run_default": "train.total_env_steps"},
        description="Env steps over which the learning rate decays linearly to 0; 0: constant. "
        "None: the run's train.total_env_steps (constant for an algorithm built outside a run).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda: bias (0) against variance (1).")
    rollout_length: int = Field(128, ge=1, description="Steps per env between updates (T).")
    epochs: int = Field(4, ge=1, description="Passes over each rollout.")
    minibatch_size: int = Field(256, ge=1, description="Steps per gradient step.")
    clip_coef: float = Field(0.2, gt=0, description="Surrogate clip: the ratio stays within 1 +- this.")
    clip_value: bool = Field(True, description="Clip the value update to clip_coef around the old value.")
    value_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.01, ge=0, description="Weight of the entropy bonus.")
    normalize_advantages: bool = Field(True, description="Standardise advantages per minibatch.")
    max_grad_norm: float = Field(0.5, gt=0, description="Gradient-norm clip.")
    target_kl: float | None = Field(
        None, gt=0, description="Stop a rollout's epochs early once the approximate KL exceeds this.")
    hidden: Widths = Field([64, 64], description="MLP widths (vector observations).")
    init_log_std: float = Field(0.0, description="Continuous actions: initial log standard deviation.")
    compile: bool = Field(
        False,
        description="torch.compile each gradient step (forward, losses, gradient, clipping, Adam): "
        "about 2.5x the gradient steps/s for small networks on a CPU, for seconds of compiling at "
        "the first update (falls back to eager, with a warning, where compiling fails).")


# --- the maths --------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
        applied: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates ``[T, B]`` from ``values`` ``[T + 1, B]`` (the last row
    bootstraps). Rows not ``applied`` get 0; nothing carries across an episode end."""
    not_terminated = (~terminated).float()
    continues = (~(terminated | truncated)).float()
    deltas = rewards + gamma * values[1:] * not_terminated - values[:-1]
    advantages = torch.empty_like(deltas)
    carry = torch.zeros_like(deltas[0])
    for t in range(len(deltas) - 1, -1, -1):
        carry = deltas[t] + gamma * lam * continues[t] * carry
        advantages[t] = carry
    return advantages * applied


class LossSettings(NamedTuple):
    """The config's numbers that PPO's loss uses: plain constants that a compiled step may close
    over (closing over a config object would recompile for every algorithm built)."""
    normalize_advantages: bool
    clip_coef: float
    clip_value: bool
    value_coef: float
    entropy_coef: float

    @classmethod
    def of(cls, config: PPOConfig) -> LossSettings:
        return cls(*(getattr(config, name) for name in cls._fields))


def clipped_losses(c: LossSettings, value: torch.Tensor, log_prob: torch.Tensor, entropy: torch.Tensor,
                   old_log_probs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
                   old_values: torch.Tensor, weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, Callable[[], Metrics]]:
    """PPO's loss over one minibatch's rows, and a function that gives its statistics.
    ``weights`` (the compiled step's fixed-shape rows): 1 for the rows that count, 0 for the rest,
    and every mean is over the rows that count; None: plain means over all rows."""
    if weights is None:
        mean = torch.Tensor.mean
    else:
        count = weights.sum()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * weights).sum() / count
    log_ratio = log_prob - old_log_probs
    ratio = log_ratio.exp()
    adv = advantages
    if c.normalize_advantages and (weights is not None or len(adv) > 1):
        if weights is None:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        else:  # the standard deviation with Bessel's correction, as Tensor.std
            centred = adv - mean(adv)
            adv = centred / (((centred ** 2 * weights).sum() / (count - 1)).sqrt() + 1e-8)
    policy_loss = mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)))
    if c.clip_value:
        clipped = old_values + (value - old_values).clamp(-c.clip_coef, c.clip_coef)
        value_loss = 0.5 * mean(torch.max((value - returns) ** 2, (clipped - returns) ** 2))
    else:
        value_loss = 0.5 * mean((value - returns) ** 2)
    entropy = mean(entropy)
    loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy

    @torch.no_grad()
    def stats() -> Metrics:
        return {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                "entropy": entropy.detach(), "approx_kl": mean((ratio - 1) - log_ratio),
                "clip_fraction": mean(((ratio - 1).abs() > c.clip_coef).float())}

    return loss, stats


def _gradient_step(spec: EnvSpec, config: PPOConfig) -> Callable:
    """One gradient step as a function of tensors (see algos/functional.py), for torch.compile.
    Its rows have a fixed shape: every row of a rollout, ``weights`` 0 on those that are no
    transitions (EnvPool's reset steps), or one gathered minibatch with weights 1. The losses are
    weighted means, so they equal the eager update's means over the rows it keeps."""
    action_dim = spec.action_shape[0] if spec.action_kind == "continuous" else 0
    net = template(("ppo", spec.obs_shape, spec.num_actions, action_dim, tuple(config.hidden)),
                   lambda: ActorCritic(spec.obs_shape, spec.num_actions, action_dim, config.hidden))
    names = [name for name, _ in net.named_parameters()]
    settings, max_grad_norm = LossSettings.of(config), config.max_grad_norm

    def step(params: list[torch.Tensor], obs: torch.Tensor, actions: torch.Tensor,
             old_log_probs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             old_values: torch.Tensor, weights: torch.Tensor, state: tuple[list[torch.Tensor], ...],
             lr: torch.Tensor) -> Metrics:
        def total_loss(ps: list[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
            bound = dict(zip(names, ps))
            head, value = functional_call(net, bound, (obs,))
            log_prob, entropy = log_prob_entropy_of(bound.get("log_std"), head, actions)
            loss, stats = clipped_losses(settings, value, log_prob, entropy, old_log_probs, advantages,
                                         returns, old_values, weights)
            return loss, stats()

        grads, metrics = grad(total_loss, has_aux=True)(params)
        clip_and_adam_(params, grads, state, lr, 1e-5, max_grad_norm)
        return metrics

    return step


# --- the algorithm ----------------------------------------------------------------------------


class PPO(ActorCriticLearner):
    Config: ClassVar[type[BaseModel]] = PPOConfig
    # A built-in default that trains at once: CartPole-v1, stopping once a greedy evaluation
    # reaches 475 (the env's reward threshold), within 100k env steps. RL-Zoo's settings with 10
    # epochs instead of 20: half the gradient steps, about the same env steps (BENCHMARKS.md).
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "ppo", "lr": 1e-3, "gamma": 0.98,
                 "gae_lambda": 0.8, "rollout_length": 32, "epochs": 10, "minibatch_size": 256,
                 "entropy_coef": 0.0, "clip_value": False},
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "actors": {"placement": "inline"},
        "train": {"total_env_steps": 100_000, "eval_every": 5_000, "eval_episodes": 20,
                  "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: PPOConfig, device: torch.device):
        super().__init__(spec, config, device)
        # Compiled (algos/functional.py), one graph does a gradient step's forward, losses,
        # gradient, clipping and torch's own Adam step on the optimizer's own state.
        self._compiled = CompiledStep(_gradient_step(spec, config), "PPO") if config.compile else None
        self._loss_settings = LossSettings.of(config)
        self._lr = torch.tensor(self.learning_rate(), dtype=torch.float32, device=device)
        if config.compile:
            self._param_views = [p.detach() for p in self._params]  # share storage with the module
            self._adam_state = adam_state(self.optimizer, self._params)

    def learned_from(self, env_steps: int) -> None:
        super().learned_from(env_steps)
        self._lr.fill_(self.learning_rate())  # a tensor: a new rate does not recompile

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._lr.fill_(self.learning_rate())
        if self.config.compile:  # the optimizer installed new state tensors: list them again
            self._adam_state = adam_state(self.optimizer, self._params)

    @property
    def data(self) -> TrajectoryData:
        extras: dict[str, tuple[tuple[int, ...], np.dtype]] = {"log_prob": ((), np.dtype(np.float32))}
        if self.spec.action_kind == "continuous":
            extras["raw_action"] = (self.spec.action_shape, np.dtype(np.float32))
        return TrajectoryData(length=self.config.rollout_length, extras=extras, wait_for_learner=True)

    def update(self, batch: TrajectoryBatch) -> tuple[Metrics, None]:
        c = self.config
        steps, envs = batch.rewards.shape
        with torch.no_grad():
            values = self.net.value(batch.obs.flatten(0, 1)).view(steps + 1, envs)
            advantages = gae(batch.rewards, values, batch.terminated, batch.truncated, batch.applied,
                             c.gamma, c.gae_lambda)
            returns = advantages + values[:-1]
        # Only applied rows are transitions; the rest (EnvPool's reset steps) drop out here.
        applied = batch.applied.flatten()
        keep = applied.nonzero().squeeze(1)
        count = len(keep)
        size = min(c.minibatch_size, count)
        whole = size == count  # one minibatch per epoch: no shuffling or gathering needed
        rows = (batch.obs[:-1].flatten(0, 1), batch.extras.get("raw_action", batch.actions).flatten(0, 1),
                batch.extras["log_prob"].flatten(), advantages.flatten(), returns.flatten(),
                values[:-1].flatten())
        self.learned_from(count)
        if self._compiled is not None and self._compiled.active and size > 1:
            metrics = self._compiled_epochs(rows, applied, keep, whole, size)
            if metrics is not None:
                return metrics, None
        obs, actions, old_log_probs, advantages, returns, old_values = (r[keep] for r in rows)
        for epoch in range(c.epochs):
            order = None if whole else torch.randperm(count, device=obs.device)
            for start in range(0, count - size + 1, size):
                idx = slice(None) if order is None else order[start:start + size]
                params, value = self.net(obs[idx])
                log_prob, entropy = log_prob_entropy(self.net, params, actions[idx])
                loss, stats = clipped_losses(self._loss_settings, value, log_prob, entropy,
                                             old_log_probs[idx], advantages[idx], returns[idx],
                                             old_values[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self._params, c.max_grad_norm, foreach=True)
                self.optimizer.step()
            metrics = stats()  # of the epoch's last minibatch only: a few ops less per gradient step
            if c.target_kl is not None and metrics["approx_kl"] > c.target_kl:
                break
        self.updates += 1
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics, None

    def _compiled_epochs(self, rows: tuple[torch.Tensor, ...], applied: torch.Tensor, keep: torch.Tensor,
                         whole: bool, size: int) -> Metrics | None:
        """The epochs through the compiled gradient step, on rows of a fixed shape: all of the
        rollout's, weighted by ``applied``, when one minibatch takes them all (their number of
        transitions varies, the shape does not), else gathered minibatches of ``size``.
        None when compiling failed at the first step: the caller updates eagerly."""
        c = self.config
        weights = applied.float() if whole else torch.ones(size, device=applied.device)
        if not whole:
            rows = tuple(r[keep] for r in rows)
        metrics: Metrics = {}
        for epoch in range(c.epochs):
            order = None if whole else torch.randperm(len(keep), device=keep.device)
            for start in range(0, len(keep) - size + 1, size):
                minibatch = rows if order is None else tuple(r[order[start:start + size]] for r in rows)
                metrics = self._compiled(self._param_views, *minibatch, weights, self._adam_state, self._lr)
                if metrics is None:
                    return None
            if c.target_kl is not None and metrics["approx_kl"] > c.target_kl:
                break
        self.updates += 1
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics
