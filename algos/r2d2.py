"""R2D2: a recurrent (LSTM) Q-network learning from replayed sequences (Kapturowski et al., 2019).

Actors carry each env's LSTM state from step to step (the engine zeroes it at episode starts)
and the sequence replay stores it with every step, so a sampled sequence starts from the state the
actor had ("stored state"); the first ``burn_in`` steps only warm that state up and get no loss.
Targets are n-step double-Q returns along the sequence under the value rescaling
``h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x``; a sequence's priority mixes the max and the mean of
its absolute TD errors. An MLP torso for vectors, the Nature CNN for Atari frames, then an LSTM and
a (dueling) head. With ``compile`` the update is one function of tensors (algos/functional.py),
compiled, its LSTM written as a loop of cell steps (``torch.compile(fullgraph=True)`` does not
trace ``nn.LSTM``)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.func import functional_call, grad

from algos.dqn import DQN
from algos.functional import CompiledStep, clip_and_adam_, rng_neutral_template
from algos.nets import LSTMWeights, NatureCNN, mlp, unrolled_lstm
from asyncrl.config import ConfigModel
from asyncrl.core import EnvSpec, Metrics, SequenceBatch, SequenceData, StateSpec


class R2D2Config(ConfigModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    adam_eps: float = Field(1e-3, gt=0, description="Adam epsilon (R2D2 uses 1e-3).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    n_step: int = Field(5, ge=1, description="Steps summed before bootstrapping, within a sequence.")
    sequence_length: int = Field(40, ge=2, description="Steps per replayed sequence, burn-in included.")
    sequence_period: int = Field(
        20, ge=1, description="Steps between sequence starts: consecutive ones overlap by length - period.")
    burn_in: int = Field(10, ge=0, description="First steps of a sequence that only warm up the LSTM state.")
    hidden: list[int] = Field([64], description="MLP torso widths (vector observations).")
    lstm_size: int = Field(64, ge=1, description="LSTM hidden units.")
    dueling: bool = Field(True, description="Dueling head: value plus mean-centred advantages.")
    double: bool = Field(True, description="Double Q: the online net picks the bootstrap action.")
    value_rescaling: bool = Field(True, description="Learn h(Q) instead of Q (h and its inverse as in R2D2).")
    rescaling_eps: float = Field(1e-3, gt=0, description="The eps of h(x) = sign(x)(sqrt(|x|+1)-1) + eps x.")
    priority_eta: float = Field(
        0.9, ge=0, le=1, description="Sequence priority: eta * max + (1 - eta) * mean of |TD errors|.")
    target_update_period: int = Field(200, ge=1, description="Updates between target-network copies.")
    eps_start: float = Field(1.0, ge=0, le=1, description="Exploration epsilon at the start.")
    eps_end: float = Field(0.02, ge=0, le=1, description="Exploration epsilon after the decay.")
    eps_decay_steps: int = Field(20_000, ge=1, description="Env steps over which epsilon decays linearly.")
    max_grad_norm: float = Field(40.0, gt=0, description="Gradient-norm clip.")
    compile: bool = Field(
        False,
        description="torch.compile the update (the forward passes over the sequences, the loss, "
        "its gradient, the clipping and Adam): more updates/s for small networks on a CPU, for "
        "seconds of compiling at the first update (falls back to eager, with a warning, where "
        "compiling fails).")

    @field_validator("hidden")
    @classmethod
    def _widths(cls, hidden: list[int]) -> list[int]:
        if not hidden or any(w < 1 for w in hidden):
            raise ValueError("must list positive layer widths")
        return hidden

    @model_validator(mode="after")
    def _sequence(self) -> R2D2Config:
        if self.burn_in > self.sequence_length - 2:
            raise ValueError(f"burn_in ({self.burn_in}) must leave at least two steps of the "
                             f"sequence ({self.sequence_length}) to learn from")
        if self.sequence_period > self.sequence_length:
            raise ValueError(f"sequence_period ({self.sequence_period}) must not exceed "
                             f"sequence_length ({self.sequence_length}): steps would never be replayed")
        return self


# --- value rescaling ----------------------------------------------------------------------------


def rescale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """h(x) = sign(x) (sqrt(|x| + 1) - 1) + eps x."""
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def unrescale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The inverse of :func:`rescale`, in closed form: ``sign(x) (r^2 - 1)`` with
    ``r = (sqrt(1 + 4 eps (|x| + 1 + eps)) - 1) / (2 eps)``, written as ``d (d + 2)`` with
    ``d = r - 1`` rearranged free of cancellation (as written, float32 loses up to ~4e-4 near 0,
    the rounding of the square root divided by 2 eps, and a compiled update rounds otherwise)."""
    d = 2.0 * x.abs() / (torch.sqrt(1.0 + 4.0 * eps * (x.abs() + 1.0 + eps)) + 1.0 + 2.0 * eps)
    return torch.sign(x) * d * (d + 2.0)


# --- networks ---------------------------------------------------------------------------------


class RecurrentQNetwork(nn.Module):
    """Torso -> LSTM -> (dueling) head, time first: ``obs [T, B, ...], (h, c) [B, H]`` ->
    ``q [T, B, A], (h, c)``."""

    def __init__(self, spec: EnvSpec, hidden: list[int], lstm_size: int, dueling: bool):
        super().__init__()
        self.pixels = len(spec.obs_shape) == 3
        if self.pixels:
            self.torso: nn.Module = NatureCNN(spec.obs_shape[0])
            features = self.torso.out_features
        else:
            self.torso = mlp(int(np.prod(spec.obs_shape)), hidden)
            features = hidden[-1]
        self.lstm = nn.LSTM(features, lstm_size)
        self.advantage = nn.Linear(lstm_size, spec.num_actions)
        self.value = nn.Linear(lstm_size, 1) if dueling else None
        with torch.no_grad():  # materialise LazyLinear: the weight store's size is fixed now
            zeros = torch.zeros(1, lstm_size)
            self(torch.from_numpy(np.zeros((1, 1, *spec.obs_shape), spec.obs_dtype)), (zeros, zeros))

    def forward(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                unrolled: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``unrolled``: the LSTM as :func:`unrolled_lstm`'s loop of cell steps (for a compiled
        update; the same numbers to rounding)."""
        t, b = obs.shape[:2]
        flat = obs.reshape(t * b, *obs.shape[2:])
        features = self.torso(flat if self.pixels else flat.float().flatten(1)).view(t, b, -1)
        h, c = state
        if unrolled:
            out, (h, c) = unrolled_lstm(self.lstm, features, (h, c))
        else:
            out, (h, c) = self.lstm(features, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
            h, c = h.squeeze(0), c.squeeze(0)
        advantage = self.advantage(out)
        q = advantage if self.value is None else \
            self.value(out) + advantage - advantage.mean(dim=-1, keepdim=True)
        return q, (h, c)


# --- the loss -----------------------------------------------------------------------------------


def n_step_targets(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                   applied: torch.Tensor, n: int, gamma: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row t of ``[T, B]`` sequences: the discounted sum of up to ``n`` rewards from t,
    the discount on the bootstrap value (0 when the episode terminated within them) and the row to
    bootstrap from. A return stops at an episode end, at a row whose action was never applied
    (a cut: its successor never came, so the return bootstraps from it) and at the sequence's
    last row (which is never itself a decision here); a row whose return takes no step has its
    bootstrap row = t."""
    length = rewards.shape[0]
    t = torch.arange(length, device=rewards.device).unsqueeze(1).expand_as(rewards)
    ended = terminated | truncated
    returns = torch.zeros_like(rewards)
    discount = torch.ones_like(rewards)
    bootstrap = t.clone()
    terminal = torch.zeros_like(applied)
    alive = applied.clone()
    for i in range(n):
        row = (t + i).clamp(max=length - 1)
        # An episode end stops the next step; an unapplied row has no step of its own, whether
        # it follows an episode end or a cut (which ends nothing).
        step = alive & applied.gather(0, row) & (t + i < length - 1)
        returns = returns + torch.where(step, discount * rewards.gather(0, row), 0.0)
        discount = torch.where(step, discount * gamma, discount)
        bootstrap = torch.where(step, row + 1, bootstrap)
        terminal = terminal | (step & terminated.gather(0, row))
        alive = step & ~ended.gather(0, row)
    return returns, torch.where(terminal, 0.0, discount), bootstrap


# A recurrent Q forward: (obs [T, B, ...], (h, c)) -> (q [T, B, A], (h, c)).
RecurrentForward = Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                            tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


def loss_settings(config: R2D2Config) -> dict[str, Any]:
    """:func:`sequence_loss`'s settings from ``config``, as plain numbers (what a compiled update
    may close over: a config object would recompile it per instance)."""
    return {name: getattr(config, name) for name in ("burn_in", "n_step", "gamma", "double",
                                                     "value_rescaling", "rescaling_eps", "priority_eta")}


def sequence_loss(batch: SequenceBatch, q_net: RecurrentForward, target_net: RecurrentForward, *,
                  burn_in: int, n_step: int, gamma: float, double: bool, value_rescaling: bool,
                  rescaling_eps: float, priority_eta: float) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
    """Squared TD loss over each sequence after its burn-in (importance-weighted per sequence),
    its metrics and the sequences' priorities (the settings: R2D2Config's fields of the names)."""
    burn = burn_in
    state = (batch.state["h"], batch.state["c"])
    with torch.no_grad():
        target_q, _ = target_net(batch.obs, state)  # the target's own burn-in from the stored state
        if burn:
            _, state = q_net(batch.obs[:burn], state)
    q_all, _ = q_net(batch.obs[burn:], state)
    target_q = target_q[burn:]
    returns, discount, bootstrap = n_step_targets(
        batch.rewards[burn:], batch.terminated[burn:], batch.truncated[burn:], batch.applied[burn:],
        n_step, gamma)
    actions = q_all.shape[-1]
    with torch.no_grad():
        rows = bootstrap.unsqueeze(-1).expand(-1, -1, actions)
        chooser = q_all.detach() if double else target_q
        best = chooser.gather(0, rows).argmax(-1, keepdim=True)
        next_value = target_q.gather(0, rows).gather(2, best).squeeze(-1)
        if value_rescaling:
            target = rescale(returns + discount * unrescale(next_value, rescaling_eps), rescaling_eps)
        else:
            target = returns + discount * next_value
    q = q_all.gather(2, batch.actions[burn:].long().unsqueeze(-1)).squeeze(-1)
    mask = (bootstrap > torch.arange(q.shape[0], device=q.device).unsqueeze(1)).float()
    td = (target - q) * mask
    count = mask.sum(0).clamp(min=1.0)
    per_sequence = 0.5 * (td * td).sum(0) / count
    loss = (batch.weights * per_sequence).mean()
    abs_td = td.detach().abs()
    priorities = priority_eta * abs_td.max(0).values + (1 - priority_eta) * abs_td.sum(0) / count
    metrics = {"td_loss": loss.detach(), "q_values": (q.detach() * mask).sum() / mask.sum().clamp(min=1.0)}
    return loss, metrics, priorities


def _functional_update(spec: EnvSpec, config: R2D2Config) -> Callable:
    """The whole update as one function of tensors (see algos/functional.py): the loss's gradient
    through torch.func, then clipping and torch's Adam on the parameters in place; the LSTM
    unrolled into cell steps (one graph)."""
    def build() -> nn.Module:
        network = RecurrentQNetwork(spec, config.hidden, config.lstm_size, config.dueling)
        network.lstm = LSTMWeights(network.lstm)  # same names, same order: the parameters line up
        return network

    net = rng_neutral_template(("r2d2", spec.obs_shape, np.dtype(spec.obs_dtype).str, spec.num_actions,
                                tuple(config.hidden), config.lstm_size, config.dueling), build)
    names = [name for name, _ in net.named_parameters()]
    settings = loss_settings(config)
    max_norm, lr, eps = config.max_grad_norm, config.lr, config.adam_eps

    def update(params: list[torch.Tensor], target_params: list[torch.Tensor], batch: SequenceBatch,
               state: tuple[list[torch.Tensor], ...]):
        def forward(ps: list[torch.Tensor]) -> RecurrentForward:
            return lambda obs, hc: functional_call(net, dict(zip(names, ps)), (obs, hc), {"unrolled": True})

        def loss_of(ps: list[torch.Tensor]):
            loss, metrics, priorities = sequence_loss(batch, forward(ps), forward(target_params), **settings)
            return loss, (metrics, priorities)

        grads, (metrics, priorities) = grad(loss_of, has_aux=True)(params)
        norm = clip_and_adam_(params, grads, state, lr, eps, max_norm)
        return metrics, priorities, norm

    return update


# --- the algorithm ----------------------------------------------------------------------------


class R2D2:
    Config: ClassVar[type[BaseModel]] = R2D2Config
    # CartPole-v1 observing only the cart position and the pole angle: velocities must be
    # inferred from the history, so a feed-forward Q-network cannot do well (configs/r2d2_cartpole.toml).
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "r2d2", "lr": 1e-3, "adam_eps": 1e-5, "gamma": 0.99, "n_step": 5, "sequence_length": 20,
                 "sequence_period": 10, "burn_in": 4, "hidden": [64], "lstm_size": 64,
                 "target_update_period": 200, "eps_decay_steps": 30_000},
        "env": {"id": "CartPole-v1", "num_envs": 16, "obs_indices": [0, 2]},
        "actors": {"placement": "inline"},
        "replay": {"capacity": 100_000, "prioritized": True, "priority_exponent": 0.9,
                   "importance_exponent": 0.6, "min_size_to_sample": 2_000, "samples_per_insert": 0.5},
        "learner": {"batch_size": 32},
        "train": {"total_env_steps": 300_000, "eval_every": 10_000, "eval_episodes": 20,
                  "target_return": 400.0},
    }

    def __init__(self, spec: EnvSpec, config: R2D2Config, device: torch.device):
        if spec.action_kind != "discrete":
            raise ValueError(f"R2D2 needs discrete actions; {spec.env_id} has continuous ones")
        self.spec, self.config, self.device = spec, config, device
        self.q = self.make_acting_network().to(device)
        self.target_q = self.make_acting_network().to(device)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        self._params = list(self.q.parameters())
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr, eps=config.adam_eps)
        self.updates = 0
        # Compiled (algos/functional.py): one graph for the forward passes, the loss, its gradient,
        # the clipping and torch's own Adam step on the optimizer's own state.
        self._compiled = CompiledStep(_functional_update(spec, config), "R2D2") if config.compile else None
        self._param_views = [p.detach() for p in self._params]  # share storage with the modules
        self._target_views = [p.detach() for p in self.target_q.parameters()]
        if config.compile:
            self._init_adam_state()

    @property
    def data(self) -> SequenceData:
        return SequenceData(length=self.config.sequence_length, period=self.config.sequence_period)

    @property
    def actor_state(self) -> StateSpec:
        shape = (self.config.lstm_size,)
        return {"h": (shape, np.dtype(np.float32)), "c": (shape, np.dtype(np.float32))}

    @property
    def acting_network(self) -> nn.Module:
        return self.q

    def make_acting_network(self) -> nn.Module:
        c = self.config
        return RecurrentQNetwork(self.spec, c.hidden, c.lstm_size, c.dueling)

    def epsilon(self, env_steps: int) -> float:
        c = self.config
        return c.eps_start + min(1.0, env_steps / c.eps_decay_steps) * (c.eps_end - c.eps_start)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int, rng: np.random.Generator,
            greedy: bool = False, state: dict[str, torch.Tensor] | None = None
            ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """Actions and each env's next LSTM state (``state``: zeros when not given)."""
        if state is None:
            zeros = torch.zeros(len(obs), self.config.lstm_size, device=obs.device)
            state = {"h": zeros, "c": zeros}
        q, (h, c) = network(obs.unsqueeze(0), (state["h"], state["c"]))
        actions = q[0].argmax(dim=1).cpu().numpy()
        if not greedy:
            explore = rng.random(len(actions)) < self.epsilon(env_steps)
            actions = np.where(explore, rng.integers(self.spec.num_actions, size=len(actions)), actions)
        return actions, {"h": h, "c": c}

    def loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
        return sequence_loss(batch, self.q, self.target_q, **loss_settings(self.config))

    # The update, the checkpointed state and the Adam state's listing are DQN's (the same
    # attributes); the target network is a hard copy every target_update_period updates.
    update = DQN.update
    _init_adam_state = DQN._init_adam_state
    state_dict = DQN.state_dict
    load_state_dict = DQN.load_state_dict

    @torch.no_grad()
    def _update_target(self) -> None:
        self.target_q.load_state_dict(self.q.state_dict())  # in place: the views stay valid
