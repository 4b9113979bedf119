"""Conditional domain-adversarial alignment (Long et al., "Conditional Adversarial Domain Adaptation",
NeurIPS 2018), a registered distance (`distance.name=cdan`) that learns and reads the model's predictions.

DANN's domain classifier D (dmssl/adversarial.py) sees the embeddings f alone, so it aligns their marginal
distribution; CDAN's D sees them together with the model's class probabilities g through the multilinear map

    T(f, g) = flatten(f g^T)                            (d K values), or, where d K > `max_map_dim`,
    T(f, g) = (f R_f) * (g R_g) / sqrt(m)               (m = `randomized_dim`; R_f, R_g fixed N(0, 1))

so that D aligns the joint distribution of embeddings and predicted classes: a labeled digit 3 is compared
with unlabeled rows the model takes for 3, not with the unlabeled set as a whole. Through a gradient reversal
layer R (identity forward, -coefficient x the gradient backward):

    L_cdan = 1/2 [ sum_i w_i BCE(D(R(T(x_i, g_i))), 1) / sum_i w_i + sum_j w_j BCE(D(R(T(y_j, g_j))), 0) / sum_j w_j ]

g is detached, as in the paper's code and TLlib's: the predictions condition D, they are not trained through
it. With `entropy_weighting` (CDAN+E) w = 1 + exp(-H(g)) gives confidently predicted rows more say; otherwise
w = 1 and each side's term is a plain mean. The sides are averaged apart, so a step's 1:mu ratio does not bias D.

D's parameters (and the random matrices, as buffers) are built by `prepare(width, num_classes)`, trained by
the run's optimizer as new layers and saved in checkpoints with the objective. The objective passes g
(`conditions_on_predictions`): the prototype classifier's softmax of each matched row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.adversarial import AdversarialOptions, domain_classifier, reverse_gradient
from dmssl.distances import DISTANCES, Distance, _check_pair
from dmssl.errors import ConfigError


def multilinear_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(n, d) x (n, K) -> (n, d K): every product f_a g_k of a row."""
    return torch.bmm(f.unsqueeze(2), g.unsqueeze(1)).flatten(1)


def randomized_multilinear_map(f: torch.Tensor, g: torch.Tensor, r_f: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:
    """(f R_f) * (g R_g) / sqrt(m): an unbiased estimate of T(f, g)'s inner products in m dimensions."""
    return (f @ r_f) * (g @ r_g) / math.sqrt(r_f.shape[1])


def entropy_weights(g: torch.Tensor) -> torch.Tensor:
    """1 + exp(-H(g)) of each row of probabilities g: (n, K)."""
    entropy = -(g * torch.log(g.clamp_min(1e-12))).sum(1)
    return 1.0 + torch.exp(-entropy)


def weighted_bce(logits: torch.Tensor, target: float, weights: torch.Tensor | None) -> torch.Tensor:
    losses = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return losses.mean() if weights is None else (weights * losses).sum() / weights.sum()


@dataclass
class CdanOptions(AdversarialOptions):
    entropy_weighting: bool = False  # CDAN+E: weight rows by 1 + exp(-entropy of the prediction)
    max_map_dim: int = 4096  # above this many products (d x K), the randomized map is used
    randomized_dim: int = 1024  # m, the randomized map's output width

    def validate(self) -> None:
        super().validate()
        for key in ("max_map_dim", "randomized_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distance.{key}={getattr(self, key)} must be >= 1")


@DISTANCES.register("cdan")
class Cdan(Distance):
    """CDAN's domain classifier on the multilinear map of embeddings and predictions (see the module)."""

    Options = CdanOptions
    learns = True
    conditions_on_predictions = True

    def __init__(self, hidden_dim: int = 256, layers: int = 2, coefficient: float = 1.0,
                 entropy_weighting: bool = False, max_map_dim: int = 4096, randomized_dim: int = 1024) -> None:
        super().__init__()
        self.hidden_dim, self.layers, self.coefficient = hidden_dim, layers, coefficient
        self.entropy_weighting, self.max_map_dim, self.randomized_dim = entropy_weighting, max_map_dim, randomized_dim
        self.classifier: nn.Module | None = None
        self.randomized = False

    def prepare(self, width: int, num_classes: int = 0) -> None:
        if num_classes < 2:
            raise ValueError(f"Cdan.prepare needs the number of classes (>= 2), got {num_classes}")
        self.randomized = width * num_classes > self.max_map_dim
        if self.randomized:
            # Fixed for the run: seeded, and buffers, so that a resumed run maps the same way.
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("r_f", torch.randn(width, self.randomized_dim, generator=generator))
            self.register_buffer("r_g", torch.randn(num_classes, self.randomized_dim, generator=generator))
        self.classifier = domain_classifier(self.randomized_dim if self.randomized else width * num_classes,
                                            self.hidden_dim, self.layers)

    def conditioned(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return randomized_multilinear_map(f, g.to(f.dtype), self.r_f.to(f.dtype), self.r_g.to(f.dtype))
        return multilinear_map(f, g.to(f.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                x_probabilities: torch.Tensor | None = None,
                y_probabilities: torch.Tensor | None = None) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("Cdan.prepare(width, num_classes) builds the domain classifier; call it before "
                               "the optimiser is made, so that the optimiser trains it")
        if x_probabilities is None or y_probabilities is None:
            raise ValueError("cdan conditions on the model's predictions: pass x_probabilities and y_probabilities")
        _check_pair(x, y)
        gx, gy = x_probabilities.detach(), y_probabilities.detach()
        logits_x = self.classifier(reverse_gradient(self.conditioned(x, gx), self.coefficient)).squeeze(1).float()
        logits_y = self.classifier(reverse_gradient(self.conditioned(y, gy), self.coefficient)).squeeze(1).float()
        wx, wy = (entropy_weights(gx.float()), entropy_weights(gy.float())) if self.entropy_weighting else (None, None)
        return 0.5 * (weighted_bce(logits_x, 1.0, wx) + weighted_bce(logits_y, 0.0, wy))
