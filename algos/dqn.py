"""DQN with the usual improvements: double Q, a dueling head, n-step returns, prioritised replay
(through the engine), a hard or Polyak target network, an epsilon schedule, Huber loss and
gradient-norm clipping. An MLP torso for vectors, the Nature CNN for Atari frames."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad

from algos.functional import CompiledStep, adam_state, clip_and_adam_, template
from algos.nets import Widths, obs_torso
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, Metrics, TransitionBatch, TransitionData


class QLearningConfig(ConfigModel):
    """The hyperparameters DQN and Rainbow share, with DQN's defaults. Each algorithm's config
    subclasses it, adding its own fields and overriding what differs; neither accepts the
    other's own fields (``extra="forbid"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon (larger than torch's default, as in Rainbow).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    n_step: int = Field(3, ge=1, description="Steps summed before bootstrapping.")
    double: bool = Field(True, description="Double Q: the online net picks the bootstrap action.")
    dueling: bool = Field(True, description="Dueling head: value plus mean-centred advantages.")
    hidden: Widths = Field([128, 128], description="MLP torso widths (vector observations).")
    target_update_period: int = Field(100, ge=1, description="Updates between target-network updates.")
    tau: float = Field(1.0, gt=0, le=1, description="Target update weight: 1 is a hard copy, <1 Polyak.")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient-norm clip.")


class DQNConfig(QLearningConfig):
    eps_start: float = Field(1.0, ge=0, le=1, description="Exploration epsilon at the start.")
    eps_end: float = Field(0.05, ge=0, le=1, description="Exploration epsilon after the decay.")
    eps_decay_steps: int = Field(10_000, ge=1, description="Env steps over which epsilon decays linearly.")
    huber_delta: float = Field(1.0, gt=0, description="Huber loss threshold on the TD error.")
    compile: bool = Field(
        False,
        description="torch.compile the loss and its gradient: several times more updates/s for "
        "small networks on a CPU, for seconds of compiling at the first update (falls back to "
        "eager, with a warning, where compiling fails).")


# --- networks ---------------------------------------------------------------------------------


class QNetwork(nn.Module):
    def __init__(self, spec: EnvSpec, hidden: list[int], dueling: bool):
        super().__init__()
        self.torso, features, self.pixels = obs_torso(spec.obs_shape, hidden)
        self.dueling = dueling
        self.advantage = nn.Linear(features, spec.num_actions)
        self.value = nn.Linear(features, 1) if dueling else None
        # Materialise LazyLinear now so parameter counts (the weight store's size) are fixed.
        with torch.no_grad():
            self(torch.from_numpy(np.zeros((1, *spec.obs_shape), spec.obs_dtype)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features = self.torso(obs if self.pixels else obs.float().flatten(1))
        advantage = self.advantage(features)
        if self.value is None:
            return advantage
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


def td_loss(batch: TransitionBatch, q_net: Callable, target_net: Callable, double: bool,
            huber_delta: float) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
    """Huber TD loss (importance-weighted), its metrics and the absolute TD errors."""
    q_all = q_net(batch.obs)
    q = q_all.gather(1, batch.actions.long().unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_target = target_net(batch.next_obs)
        if double:
            next_action = q_net(batch.next_obs).argmax(dim=1, keepdim=True)
        else:
            next_action = next_target.argmax(dim=1, keepdim=True)
        bootstrap = next_target.gather(1, next_action).squeeze(1)
        target = batch.rewards + batch.discounts * bootstrap
    td_error = target - q
    per_item = F.huber_loss(q, target, reduction="none", delta=huber_delta)
    loss = (batch.weights * per_item).mean()
    metrics = {"td_loss": loss.detach(), "q_values": q.detach().mean()}
    return loss, metrics, td_error.detach().abs()


def _functional_update(spec: EnvSpec, config: DQNConfig) -> Callable:
    """The whole update as one function of tensors (see algos/functional.py): the loss's
    gradient through torch.func, then clipping and torch's Adam on the parameters in place."""
    net = template(("dqn", spec.obs_shape, np.dtype(spec.obs_dtype).str, spec.num_actions,
                    tuple(config.hidden), config.dueling),
                   lambda: QNetwork(spec, config.hidden, config.dueling))
    names = [name for name, _ in net.named_parameters()]
    double, delta, max_norm = config.double, config.huber_delta, config.max_grad_norm
    lr, eps = config.lr, config.adam_eps

    def update(params: list[torch.Tensor], target_params: list[torch.Tensor],
               batch: TransitionBatch, state: tuple[list[torch.Tensor], ...]):
        def loss_of(ps: list[torch.Tensor]):
            def q_net(x):
                return functional_call(net, dict(zip(names, ps)), (x,))

            def target_net(x):
                return functional_call(net, dict(zip(names, target_params)), (x,))

            loss, metrics, priorities = td_loss(batch, q_net, target_net, double, delta)
            return loss, (metrics, priorities)

        grads, (metrics, priorities) = grad(loss_of, has_aux=True)(params)
        norm = clip_and_adam_(params, grads, state, lr, eps, max_norm)
        return metrics, priorities, norm

    return update


# --- the algorithm ----------------------------------------------------------------------------


class DQN:
    Config: ClassVar[type[BaseModel]] = DQNConfig
    # A built-in default that trains at once: CartPole-v1, stopping once a greedy evaluation
    # reaches 475 (the env's reward threshold), within 100k env steps. Tuned over seeds: see
    # BENCHMARKS.md.
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "dqn", "lr": 2.5e-3},
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "replay": {"capacity": 100_000, "min_size_to_sample": 1_000, "samples_per_insert": 16.0},
        "learner": {"batch_size": 128},
        "train": {"total_env_steps": 100_000, "eval_every": 10_000, "eval_episodes": 20,
                  "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: DQNConfig, device: torch.device):
        if spec.action_kind != "discrete":
            raise ValueError(f"DQN needs discrete actions; {spec.env_id} has continuous ones")
        self.spec, self.config, self.device = spec, config, device
        self.q = QNetwork(spec, config.hidden, config.dueling).to(device)
        self.target_q = QNetwork(spec, config.hidden, config.dueling).to(device)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        # Fused Adam and foreach clipping: fewer kernel launches, which is most of the cost of a
        # small network's update on a CPU (~10% here) and on a GPU alike.
        self._params = list(self.q.parameters())
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr, eps=config.adam_eps, fused=True)
        self.updates = 0
        # Compiled (algos/functional.py), one graph does the forward passes, the loss, its
        # gradient, the clipping and torch's own Adam step on the optimizer's own state.
        self._compiled = CompiledStep(_functional_update(spec, config), "DQN") if config.compile else None
        self._param_views = [p.detach() for p in self._params]  # share storage with the modules
        self._target_views = [p.detach() for p in self.target_q.parameters()]
        if config.compile:
            self._init_adam_state()

    @property
    def data(self) -> TransitionData:
        return TransitionData(n_step=self.config.n_step, gamma=self.config.gamma)

    @property
    def acting_network(self) -> nn.Module:
        return self.q

    def make_acting_network(self) -> nn.Module:
        return QNetwork(self.spec, self.config.hidden, self.config.dueling)

    def epsilon(self, env_steps: int) -> float:
        c = self.config
        frac = min(1.0, env_steps / c.eps_decay_steps)
        return c.eps_start + frac * (c.eps_end - c.eps_start)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int,
            rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        actions = network(obs).argmax(dim=1).cpu().numpy()
        if not greedy:
            explore = rng.random(len(actions)) < self.epsilon(env_steps)
            actions = np.where(explore, rng.integers(self.spec.num_actions, size=len(actions)), actions)
        return actions

    def loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
        """Huber TD loss of the online network against the target network."""
        return td_loss(batch, self.q, self.target_q, self.config.double, self.config.huber_delta)

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        stepped = None if self._compiled is None else \
            self._compiled(self._param_views, self._target_views, batch, self._adam_state)
        if stepped is not None:
            metrics, priorities, grad_norm = stepped
        else:
            loss, metrics, priorities = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self._params, self.config.max_grad_norm, foreach=True)
            self.optimizer.step()
        self.updates += 1
        if self.updates % self.config.target_update_period == 0:
            self._update_target()
        metrics["grad_norm"] = grad_norm
        return metrics, priorities

    def _init_adam_state(self) -> None:
        self._adam_state = adam_state(self.optimizer, self._params)

    @torch.no_grad()
    def _update_target(self) -> None:
        tau = self.config.tau
        if tau >= 1.0:
            self.target_q.load_state_dict(self.q.state_dict())
            return
        for target, online in zip(self.target_q.parameters(), self.q.parameters()):
            target.lerp_(online, tau)

    def state_dict(self) -> dict[str, Any]:
        return {
            "q": self.q.state_dict(),
            "target_q": self.target_q.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q.load_state_dict(state["q"])
        self.target_q.load_state_dict(state["target_q"])
        self.optimizer.load_state_dict(state["optimizer"])  # new state tensors: list them again
        self.updates = int(state["updates"])
        if self.config.compile:
            self._init_adam_state()
