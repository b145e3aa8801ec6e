"""Network pieces shared by the algorithms: an MLP torso for vectors, the Nature CNN for frames."""

from __future__ import annotations

import torch
from torch import nn


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


def mlp(in_features: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers)
