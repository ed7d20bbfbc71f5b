"""A small digits classifier: class accuracy of guided samples and features for a Fréchet distance."""

from __future__ import annotations

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    """Two conv layers and two dense layers; ``features`` (64-d, after ReLU) is the penultimate layer."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, self.FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, the space of the Fréchet distance."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
