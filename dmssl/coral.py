"""CORAL: match the covariances of the two sets (Sun and Saenko, "Deep CORAL: Correlation Alignment for
Deep Domain Adaptation", ECCV 2016 workshops), a registered distance (`distance.name=coral`).

    CORAL(x, y) = || C_x - C_y ||_F^2 / (4 d^2),   C = (A^T A - (1^T A)^T (1^T A) / n) / (n - 1)

for x: (n, d) and y: (m, d). With `match_means` the squared distance of the means is added (Deep CORAL
leaves the first moment to the classifier; matching it too is the "CORAL + mean" variant of TLlib).
O((n + m) d^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmssl.distances import DISTANCES, Distance, _check_pair


def covariance(a: torch.Tensor) -> torch.Tensor:
    """The (d, d) unbiased sample covariance of the rows of a: (n, d), n >= 2."""
    centred = a - a.mean(0, keepdim=True)
    return centred.T @ centred / (a.shape[0] - 1)


def coral(x: torch.Tensor, y: torch.Tensor, match_means: bool = False) -> torch.Tensor:
    """|| Cov(x) - Cov(y) ||_F^2 / (4 d^2), plus || mean(x) - mean(y) ||^2 with `match_means`."""
    _check_pair(x, y, min_rows=2)
    d = x.shape[1]
    x, y = x.float(), y.float()  # a covariance of bf16 rows loses the small entries it is about
    value = (covariance(x) - covariance(y)).pow(2).sum() / (4 * d * d)
    if match_means:
        value = value + (x.mean(0) - y.mean(0)).pow(2).sum()
    return value


@dataclass
class CoralOptions:
    match_means: bool = False  # also match the means (squared distance), not only the covariances


@DISTANCES.register("coral")
class Coral(Distance):
    """Correlation alignment (see `coral`): second moments only, unless `match_means`."""

    Options = CoralOptions

    def __init__(self, match_means: bool = False) -> None:
        super().__init__()
        self.match_means = match_means

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return coral(x, y, self.match_means)
