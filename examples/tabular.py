"""A complete modality adapter in one file: tabular data (scikit-learn's breast-cancer table).

This is the example of docs/writing-an-adapter.md. Run it with

    python train.py recipe=examples/tabular.yaml

569 tumours x 30 numeric features, 2 classes, bundled with scikit-learn (no download). Views follow
SCARF (Bahri et al., ICLR 2022): the strong view replaces a random subset of features by the same
features of other rows (drawn from each feature's empirical marginal), the weak view adds a little noise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from dmssl.errors import ConfigError, DataError
from dmssl.modality import Modality, RawData


@dataclass
class TabularOptions:
    """`modality:` keys of this adapter."""

    test_fraction: float = 0.3  # a seeded share of the rows held out for testing
    weak_noise: float = 0.05  # std of the weak view's Gaussian noise (features are standardised)
    corruption: float = 0.3  # share of features the strong view resamples from other rows
    strong_noise: float = 0.1

    def validate(self) -> None:
        if not 0 < self.test_fraction < 1 or not 0 <= self.corruption < 1:
            raise ConfigError("modality.test_fraction must be in (0, 1) and modality.corruption in [0, 1)")


class TabularModality(Modality):
    """Rows of standardised float features; encoder: a 2-layer MLP."""

    Options = TabularOptions
    defaults = {"distance": {"kernel": "gaussian", "median_scales": [0.5, 1.0, 2.0]}}

    def load(self) -> RawData:
        if self.data.dataset != "breast_cancer":
            raise DataError(f"data.dataset={self.data.dataset!r}: this example reads only breast_cancer")
        from sklearn.datasets import load_breast_cancer

        table = load_breast_cancer()
        features = torch.tensor(table.data, dtype=torch.float32)
        labels = [int(y) for y in table.target]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
        cut = int(len(order) * self.options.test_fraction)
        test, train = order[:cut], order[cut:]
        mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
        features = (features - mean) / std  # statistics of the training rows only
        self.marginals = features[train]  # rows the strong view borrows feature values from
        return RawData(train=list(features[train]), train_labels=[labels[i] for i in train],
                       test=list(features[test]), test_labels=[labels[i] for i in test],
                       class_names=list(table.target_names))

    def weak(self, row: torch.Tensor) -> torch.Tensor:
        """Add Gaussian noise of std `weak_noise`."""
        return row + self.options.weak_noise * torch.randn(row.shape)

    def strong(self, row: torch.Tensor) -> torch.Tensor:
        """Replace a `corruption` share of the features by other rows' values, then add noise."""
        donor = self.marginals[random.randrange(len(self.marginals))]
        replaced = torch.rand(row.shape) < self.options.corruption
        return torch.where(replaced, donor, row) + self.options.strong_noise * torch.randn(row.shape)

    def collate(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(views)

    def build_encoder(self) -> nn.Module:
        return MLP(in_features=30, width=self.model.width or 128)


class MLP(nn.Module):
    """Linear-BN-ReLU twice; `feature_dim` is what the core's projection head reads."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.feature_dim = width

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows)
