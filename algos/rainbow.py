"""Rainbow (Hessel et al., 2018): DQN with a distributional C51 head and its projected Bellman
target, factorised-Gaussian noisy layers in place of epsilon-greedy exploration, double Q, a
dueling head, n-step returns and prioritised replay (through the engine) by the KL loss.

The return of each action is a categorical distribution over ``num_atoms`` fixed values (the
support, evenly spaced on ``[v_min, v_max]``); its Q value is the distribution's mean. Actors act
greedily on noisy weights; evaluation acts greedily on the mean weights (no noise). With
``compile`` the update is one function of tensors (algos/functional.py), compiled; its noise is
drawn eagerly, as the eager update draws it, and passed in."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from torch import nn
from torch.func import functional_call, grad

from algos.dqn import DQN, QLearningConfig
from algos.functional import CompiledStep, clip_and_adam_, rng_neutral_template
from algos.nets import NoisyLinear, obs_torso
from asyncrl.core import EnvSpec, Metrics, TransitionBatch, TransitionData


# The hyperparameters shared with DQN (same meaning) come from QLearningConfig; here are the
# paper's Adam settings, the distribution's support, the noisy layers and compile. DQN's epsilon
# schedule and Huber loss are DQNConfig's only, so a rainbow config that sets them is rejected
# (extra="forbid"). A comment, not a docstring: that would change the JSON schema's description.
class RainbowConfig(QLearningConfig):
    lr: float = Field(6.25e-5, gt=0, description="Adam learning rate (the paper's, for Atari).")
    adam_eps: float = Field(1.5e-4, gt=0, description="Adam epsilon (the paper's: lr / 400-ish).")
    dueling: bool = Field(True, description="Dueling head: value plus mean-centred advantages, per atom.")
    num_atoms: int = Field(51, ge=2, description="Atoms of each return distribution (C51: 51).")
    v_min: float = Field(-10.0, description="Smallest return the support holds (lower values are clipped to it).")
    v_max: float = Field(10.0, description="Largest return the support holds (higher values are clipped to it).")
    noisy_std: float = Field(
        0.5, gt=0, description="sigma_0 of the noisy layers: each noise scale starts at "
        "sigma_0 / sqrt(fan_in).")
    compile: bool = Field(
        False,
        description="torch.compile the update (the forward passes, the loss, its gradient, the "
        "clipping and Adam): more updates/s for small networks on a CPU, for seconds of compiling "
        "at the first update (falls back to eager, with a warning, where compiling fails).")

    @field_validator("v_max")
    @classmethod
    def _support(cls, v_max: float, info: ValidationInfo) -> float:
        v_min = info.data.get("v_min")
        if v_min is not None and not v_max > v_min:
            raise ValueError(f"must be greater than v_min ({v_min})")
        return v_max


# --- network ----------------------------------------------------------------------------------


class DistributionalQNetwork(nn.Module):
    """Log-probabilities over the support for every action: ``(batch, actions, atoms)``.

    The torso (MLP or Nature CNN) is DQN's; the value and advantage streams are noisy layers, so
    that the noise, which the loss learns to shrink where it does not pay, drives exploration."""

    def __init__(self, spec: EnvSpec, config: RainbowConfig):
        super().__init__()
        self.torso, features, self.pixels = obs_torso(spec.obs_shape, config.hidden)
        self.num_actions, self.num_atoms = spec.num_actions, config.num_atoms
        self.advantage = NoisyLinear(features, spec.num_actions * config.num_atoms, config.noisy_std)
        self.value = NoisyLinear(features, config.num_atoms, config.noisy_std) if config.dueling else None
        # From the config, not learned: kept out of the state dict and the weight store alike.
        self.register_buffer("support", torch.linspace(config.v_min, config.v_max, config.num_atoms),
                             persistent=False)
        # Materialise LazyLinear now so parameter counts (the weight store's size) are fixed.
        with torch.no_grad():
            self(torch.from_numpy(np.zeros((1, *spec.obs_shape), spec.obs_dtype)))

    def forward(self, obs: torch.Tensor, noisy: bool = False, generator: torch.Generator | None = None,
                noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``noisy``: sample the noisy layers' weights (one draw for the batch, from
        ``generator``); otherwise use their means. ``noise``: that draw made beforehand
        (:meth:`draw_noise`), used instead of drawing (with ``noisy``)."""
        draws = [None, None] if noise is None else [*noise, None]  # the value layer's: None without one
        features = self.torso(obs if self.pixels else obs.float().flatten(1))
        logits = self.advantage(features, noisy, generator, draws[0])
        logits = logits.view(-1, self.num_actions, self.num_atoms)
        if self.value is not None:
            value = self.value(features, noisy, generator, draws[1]).unsqueeze(1)
            logits = value + logits - logits.mean(dim=1, keepdim=True)
        return logits.log_softmax(dim=-1)

    def draw_noise(self) -> tuple[torch.Tensor, ...]:
        """One noisy forward's draws from torch's global generator, in the order ``forward``
        draws them (the advantage layer's, then the value layer's)."""
        return tuple(layer.draw() for layer in (self.advantage, self.value) if layer is not None)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The mean of each action's distribution: ``(batch, actions)``."""
        return expected_values(log_probs, self.support)


def expected_values(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The means of distributions over ``support`` given as log-probabilities (last dimension)."""
    return (log_probs.exp() * support).sum(dim=-1)


# --- loss -------------------------------------------------------------------------------------


def project_distribution(probs: torch.Tensor, rewards: torch.Tensor, discounts: torch.Tensor,
                         support: torch.Tensor) -> torch.Tensor:
    """C51's projected Bellman target: the distribution of ``rewards + discounts * Z`` (``Z`` with
    ``probs`` on ``support``, shapes ``(batch, atoms)``, ``(batch,)``, ``(batch,)``, ``(atoms,)``)
    mapped back onto ``support``. Each shifted atom, clipped to ``[v_min, v_max]``, splits its
    probability between the two atoms around it in proportion to its closeness to each."""
    batch, atoms = probs.shape
    spacing = support[1] - support[0]
    shifted = (rewards.unsqueeze(1) + discounts.unsqueeze(1) * support).clamp(support[0], support[-1])
    position = ((shifted - support[0]) / spacing).clamp(0, atoms - 1)  # in atoms (clamp: rounding)
    lower = position.floor().clamp(max=atoms - 2)  # the top atom splits as (0 below, 1 on it)
    upper_share = position - lower
    # Every row's mass lands in its own slice of one flat vector: one scatter for the batch.
    flat_lower = (lower.long() + atoms * torch.arange(batch, device=probs.device).unsqueeze(1)).view(-1)
    projected = torch.zeros(batch * atoms, dtype=probs.dtype, device=probs.device)
    projected.index_add_(0, flat_lower, (probs * (1 - upper_share)).view(-1))
    projected.index_add_(0, flat_lower + 1, (probs * upper_share).view(-1))
    return projected.view(batch, atoms)


# A network's noisy forward: (obs, the noisy layers' draws) -> log-probs (batch, actions, atoms).
NoisyForward = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def distributional_loss(batch: TransitionBatch, online: NoisyForward, target: NoisyForward,
                        support: torch.Tensor, double: bool, noise: Sequence[Sequence[torch.Tensor]]
                        ) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
    """Cross-entropy of the online distribution of the taken action against the projected target
    (importance-weighted), its metrics, and each item's KL divergence as its new priority (the
    cross-entropy less the target's entropy: same gradient, 0 when the fit is exact). ``noise``:
    the draws of the noisy forwards in turn (online on obs, target on next obs, then, with
    ``double``, online on next obs)."""
    rows = torch.arange(len(batch.actions), device=batch.actions.device)
    log_probs = online(batch.obs, noise[0])[rows, batch.actions.long()]
    with torch.no_grad():
        next_target = target(batch.next_obs, noise[1])
        chooser = online(batch.next_obs, noise[2]) if double else next_target
        next_action = expected_values(chooser, support).argmax(dim=1)
        projected = project_distribution(next_target[rows, next_action].exp(), batch.rewards,
                                         batch.discounts, support)
    cross_entropy = -(projected * log_probs).sum(dim=1)
    loss = (batch.weights * cross_entropy).mean()
    with torch.no_grad():
        kl = cross_entropy + torch.special.xlogy(projected, projected).sum(dim=1)
        q = expected_values(log_probs, support)
    metrics = {"loss": loss.detach(), "kl": kl.mean(), "q_values": q.mean()}
    return loss, metrics, kl.clamp(min=0)


def _functional_update(spec: EnvSpec, config: RainbowConfig) -> Callable:
    """The whole update as one function of tensors (see algos/functional.py): the loss's gradient
    through torch.func, then clipping and torch's Adam on the parameters in place. The noise
    comes in, drawn eagerly as the eager update draws it (compiled draws would differ)."""
    net = rng_neutral_template(
        ("rainbow", spec.obs_shape, np.dtype(spec.obs_dtype).str, spec.num_actions,
         tuple(config.hidden), config.dueling, config.num_atoms),
        lambda: DistributionalQNetwork(spec, config))
    names = [name for name, _ in net.named_parameters()]
    double, max_norm, lr, eps = config.double, config.max_grad_norm, config.lr, config.adam_eps

    def update(params: list[torch.Tensor], target_params: list[torch.Tensor], support: torch.Tensor,
               batch: TransitionBatch, noise: list[tuple[torch.Tensor, ...]],
               state: tuple[list[torch.Tensor], ...]):
        def forward(ps: list[torch.Tensor]) -> NoisyForward:
            return lambda obs, draws: functional_call(net, dict(zip(names, ps)), (obs,),
                                                      {"noisy": True, "noise": draws})

        def loss_of(ps: list[torch.Tensor]):
            loss, metrics, priorities = distributional_loss(batch, forward(ps), forward(target_params),
                                                            support, double, noise)
            return loss, (metrics, priorities)

        grads, (metrics, priorities) = grad(loss_of, has_aux=True)(params)
        norm = clip_and_adam_(params, grads, state, lr, eps, max_norm)
        return metrics, priorities, norm

    return update


# --- the algorithm ----------------------------------------------------------------------------


class Rainbow:
    Config: ClassVar[type[BaseModel]] = RainbowConfig
    # A built-in default that trains at once: CartPole-v1, stopping once a greedy evaluation
    # reaches 475 (the env's reward threshold), within 100k env steps. CartPole pays 1 a step, so
    # returns lie in [0, 1 / (1 - gamma)] = [0, 100].
    preset: ClassVar[dict[str, Any]] = {
        "algo": {"name": "rainbow", "lr": 2.5e-3, "adam_eps": 1e-5, "v_min": 0.0, "v_max": 100.0},
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "replay": {"capacity": 100_000, "min_size_to_sample": 1_000, "samples_per_insert": 16.0,
                   "prioritized": True, "priority_exponent": 0.5, "importance_exponent": 0.4},
        "learner": {"batch_size": 128},
        "train": {"total_env_steps": 100_000, "eval_every": 10_000, "eval_episodes": 20,
                  "target_return": 475.0},
    }

    def __init__(self, spec: EnvSpec, config: RainbowConfig, device: torch.device):
        if spec.action_kind != "discrete":
            raise ValueError(f"Rainbow needs discrete actions; {spec.env_id} has continuous ones")
        self.spec, self.config, self.device = spec, config, device
        self.q = DistributionalQNetwork(spec, config).to(device)
        self.target_q = DistributionalQNetwork(spec, config).to(device)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        self._params = list(self.q.parameters())
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr, eps=config.adam_eps, fused=True)
        self.updates = 0
        # Compiled (algos/functional.py): one graph for the forward passes, the loss, its gradient,
        # the clipping and torch's own Adam step on the optimizer's own state.
        self._compiled = CompiledStep(_functional_update(spec, config), "Rainbow") if config.compile else None
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
        return DistributionalQNetwork(self.spec, self.config)

    @torch.no_grad()
    def act(self, network: nn.Module, obs: torch.Tensor, env_steps: int,
            rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        """Greedy on the mean Q. Acting, noisy weights (a draw per acting batch, seeded from the
        actor's ``rng`` so that actors draw apart and a serial run repeats) explore; ``greedy``
        (evaluation) uses the mean weights. No schedule: ``env_steps`` is not needed."""
        if greedy:
            log_probs = network(obs)
        else:
            noise = torch.Generator(obs.device).manual_seed(int(rng.integers(2**63)))
            log_probs = network(obs, noisy=True, generator=noise)
        return network.q_values(log_probs).argmax(dim=1).cpu().numpy()

    def draw_noise(self) -> list[tuple[torch.Tensor, ...]]:
        """The draws of a loss's noisy forwards, from torch's global generator in the loss's order
        (online, target, then online again with ``double``)."""
        return [self.q.draw_noise() for _ in range(3 if self.config.double else 2)]

    def loss(self, batch: TransitionBatch, noise: list[tuple[torch.Tensor, ...]] | None = None
             ) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
        """``noise``: :meth:`draw_noise`'s (drawn here when None)."""
        def forward(net: DistributionalQNetwork) -> NoisyForward:
            return lambda obs, draws: net(obs, noisy=True, noise=draws)

        return distributional_loss(batch, forward(self.q), forward(self.target_q), self.q.support,
                                   self.config.double, self.draw_noise() if noise is None else noise)

    def update(self, batch: TransitionBatch) -> tuple[Metrics, torch.Tensor]:
        noise = self.draw_noise()  # either way, so that a failed compile's eager update draws alike
        stepped = None if self._compiled is None else self._compiled(
            self._param_views, self._target_views, self.q.support, batch, noise, self._adam_state)
        if stepped is not None:
            metrics, priorities, grad_norm = stepped
        else:
            loss, metrics, priorities = self.loss(batch, noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self._params, self.config.max_grad_norm, foreach=True)
            self.optimizer.step()
        self.updates += 1
        if self.updates % self.config.target_update_period == 0:
            self._update_target()
        metrics["grad_norm"] = grad_norm
        return metrics, priorities

    # The target network's update, the checkpointed state and its loading (listing the compiled
    # update's Adam state again) are DQN's: the same attributes.
    _update_target = DQN._update_target
    _init_adam_state = DQN._init_adam_state
    state_dict = DQN.state_dict
    load_state_dict = DQN.load_state_dict
