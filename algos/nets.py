"""Network pieces shared by the algorithms: an MLP torso for vectors, the Nature CNN for frames,
noisy linear layers, an LSTM unrolled into cell steps (for torch.compile), twin Q critics for
continuous actions and the map from [-1, 1] to an action space's bounds."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

from asyncrl.core import EnvSpec


def _positive_widths(hidden: list[int]) -> list[int]:
    if not hidden or any(w < 1 for w in hidden):
        raise ValueError("must list positive layer widths")
    return hidden


# The type of a config's layer widths: a non-empty list of positive ints.
Widths = Annotated[list[int], AfterValidator(_positive_widths)]


class NatureCNN(nn.Module):
    """The DQN paper's torso; takes uint8 frames and scales them on the device."""

    def __init__(self, in_channels: int, out_features: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(out_features), nn.ReLU(),
        )
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


def obs_torso(obs_shape: tuple[int, ...], hidden: list[int]) -> tuple[nn.Module, int, bool]:
    """The value-based torso for an observation shape: ``(module, out_features, pixels)``, the
    Nature CNN for frames (``pixels``: feed it the frames as they are), else an MLP of ``hidden``
    widths (feed it the observations as float, flattened)."""
    if len(obs_shape) == 3:
        cnn = NatureCNN(obs_shape[0])
        return cnn, cnn.out_features, True
    return mlp(math.prod(obs_shape), hidden), hidden[-1], False


def mlp(in_features: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers)


class NoisyLinear(nn.Module):
    """A linear layer with learned factorised Gaussian noise on its weights and biases (Fortunato
    et al., "Noisy Networks for Exploration"): ``w = mu_w + sigma_w * f(eps_out) f(eps_in)^T`` and
    ``b = mu_b + sigma_b * f(eps_out)`` with ``f(x) = sign(x) sqrt(|x|)``, one draw per call (the
    whole batch shares it, as in the paper; per-row draws cost more than the layer itself).
    ``noisy=False`` uses the mean weights (greedy evaluation)."""

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = in_features ** -0.5
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), sigma0 * bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), sigma0 * bound))

    def draw(self, generator: torch.Generator | None = None, like: torch.Tensor | None = None
             ) -> torch.Tensor:
        """One call's standard-normal draw (``in + out`` values, the dtype and device of ``like``,
        else of the weights) from ``generator`` (torch's global one when None), as ``forward``
        draws it."""
        like = self.weight_mu if like is None else like
        return torch.randn(self.in_features + self.out_features, dtype=like.dtype, device=like.device,
                           generator=generator)

    def forward(self, x: torch.Tensor, noisy: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """``generator``: where the noise comes from (torch's global one when None). ``noise``:
        a :meth:`draw` made beforehand, used instead of drawing (a compiled update's random
        numbers would differ from eager ones, so it draws them eagerly and passes them in)."""
        if not noisy:
            return nn.functional.linear(x, self.weight_mu, self.bias_mu)
        if noise is None:
            noise = self.draw(generator, x)
        noise = noise.sign() * noise.abs().sqrt()
        noise_in, noise_out = noise[: self.in_features], noise[self.in_features:]
        weight = torch.addcmul(self.weight_mu, self.weight_sigma, torch.outer(noise_out, noise_in))
        bias = torch.addcmul(self.bias_mu, self.bias_sigma, noise_out)
        return nn.functional.linear(x, weight, bias)


class LSTMWeights(nn.Module):
    """An ``nn.LSTM``'s parameters under their names, without the module: for a compiled update's
    template, which runs the LSTM unrolled (``torch.compile`` refuses code that touches an
    ``nn.LSTM`` at all: "Attempted to wrap RNN, GRU, or LSTM")."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        for name, parameter in lstm.named_parameters():
            self.register_parameter(name, parameter)


def unrolled_lstm(lstm: nn.LSTM | LSTMWeights, inputs: torch.Tensor,
                  state: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``lstm`` (one layer, with biases) over ``inputs [T, B, in]`` from ``state`` (h, c, each
    ``[B, H]``) as a loop of cell steps, in the order of torch's CPU kernel (the input projection
    for the whole sequence first): ``out [T, B, H], (h, c)``."""
    h, c = state
    projected = nn.functional.linear(inputs, lstm.weight_ih_l0, lstm.bias_ih_l0)
    outputs = []
    for x in projected.unbind(0):
        gates = nn.functional.linear(h, lstm.weight_hh_l0, lstm.bias_hh_l0) + x
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


class EnsembleMLP(nn.Module):
    """``members`` independent MLPs evaluated in one batched matmul per layer (twin critics).

    Two critics as one module cost three ``baddbmm`` calls instead of six ``addmm``: fewer kernel
    launches, which is most of a small network's update time on a CPU. Each member is initialised
    as ``nn.Linear`` would be."""

    def __init__(self, members: int, in_features: int, hidden: list[int], out_features: int):
        super().__init__()
        self.members = members
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip([in_features, *hidden], [*hidden, out_features]):
            bound = fan_in ** -0.5
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """``x`` (batch, in) -> (members, batch, out). ``frozen``: no gradient reaches the
        parameters (still through ``x``), e.g. for a policy loss that must not train the critics."""
        h = x.unsqueeze(0).expand(self.members, *x.shape)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if frozen:
                weight, bias = weight.detach(), bias.detach()
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = torch.relu(h)
        return h


class TwinCritic(nn.Module):
    """Two Q(obs, action) networks as one ensemble: (2, batch) values in one batched call."""

    def __init__(self, spec: EnvSpec, hidden: list[int]):
        super().__init__()
        in_features = math.prod(spec.obs_shape) + math.prod(spec.action_shape)
        self.q = EnsembleMLP(2, in_features, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        x = torch.cat([obs.float().flatten(1), action.flatten(1)], dim=1)
        return self.q(x, frozen).squeeze(-1)


def action_bounds(spec: EnvSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, centre) mapping [-1, 1] onto a bounded continuous action space, as float32.
    Raises ValueError for discrete or unbounded action spaces."""
    if spec.action_kind != "continuous":
        raise ValueError(f"needs continuous actions; {spec.env_id} has discrete ones")
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (spec.action_low, spec.action_high))
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"needs bounded actions; {spec.env_id} has infinite bounds")
    return (high - low) / 2, (high + low) / 2
def _layer(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """A policy and a value head for on-policy algorithms (PPO, IMPALA).

    Vector observations: separate tanh MLPs for the policy and the value (sharing hurts both on
    small control tasks). Frames: one Nature CNN torso under both heads. Discrete actions give
    logits; continuous ones a Gaussian mean with a state-independent log standard deviation.
    Orthogonal initialisation, small on the policy output (a near-uniform first policy).
    """

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, action_dim: int,
                 hidden: list[int], init_log_std: float = 0.0):
        super().__init__()
        self.pixels = len(obs_shape) == 3
        self.continuous = num_actions == 0
        outputs = action_dim if self.continuous else num_actions
        if self.pixels:
            self.torso: nn.Module | None = NatureCNN(obs_shape[0])
            features = self.torso.out_features
            self.policy_body: nn.Module = nn.Identity()
            self.value_body: nn.Module = nn.Identity()
            policy_in = value_in = features
        else:
            self.torso = None
            size = 1
            for dim in obs_shape:
                size *= dim
            self.policy_body, self.value_body = _tanh_mlp(size, hidden), _tanh_mlp(size, hidden)
            policy_in = value_in = hidden[-1]
        self.policy_head = _layer(nn.Linear(policy_in, outputs), 0.01)
        self.value_head = _layer(nn.Linear(value_in, 1), 1.0)
        self.log_std = nn.Parameter(torch.full((action_dim,), init_log_std)) if self.continuous else None
        with torch.no_grad():  # materialise LazyLinear: the weight store's size is fixed from here
            self.forward(torch.zeros((1, *obs_shape)))

    def _features(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.torso is not None:
            features = self.torso(obs)
            return features, features
        flat = obs.float().flatten(1)
        return flat, flat

    # The layers are applied with the functional ops that nn.Linear and nn.Tanh call, without each
    # module call's hook machinery: the same numbers, ~18% less time for an 8-env acting forward
    # (38 against 46 us here).

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (discrete) or the Gaussian mean (continuous)."""
        features, _ = self._features(obs)
        return _apply(self.policy_head, _apply(self.policy_body, features))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        _, features = self._features(obs)
        return _apply(self.value_head, _apply(self.value_body, features)).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        policy_features, value_features = self._features(obs)
        return (_apply(self.policy_head, _apply(self.policy_body, policy_features)),
                _apply(self.value_head, _apply(self.value_body, value_features)).squeeze(-1))


def _tanh_mlp(in_features: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [_layer(nn.Linear(in_features, width), 2 ** 0.5), nn.Tanh()]
        in_features = width
    return nn.Sequential(*layers)


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a Linear, a Tanh, an Identity or a Sequential of them, by the functional
    ops those modules' forwards call (the same results); anything else is called as a module."""
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = _apply(layer, x)
        return x
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, module.weight, module.bias)
    if isinstance(module, nn.Tanh):
        return torch.tanh(x)
    if isinstance(module, nn.Identity):
        return x
    return module(x)
