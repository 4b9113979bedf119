"""Domain-adversarial alignment (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016),
a registered distance (`distance.name=adversarial`) that learns.

A small domain classifier D (an MLP on the matched embeddings) tells labeled rows (domain 1) from
unlabeled rows (domain 0). Its input passes through a gradient reversal layer R (identity forward,
-coefficient x the gradient backward), so one minimisation trains D to separate the two sides and the
encoder to make them inseparable:

    L_adv(x, y) = 1/2 [ mean_i BCE(D(R(x_i)), 1) + mean_j BCE(D(R(y_j)), 0) ]

The two sides are averaged separately, so a step's 1:mu labeled/unlabeled ratio does not bias D. The value
logged as the run's `distance` is D's loss: about 2 ln 2 / 2 = 0.69 when the sides cannot be told apart,
lower while they can. The weight lambda_dm scales D's loss and the reversed gradient alike (as TLlib's
`trade_off`); `objective.dm_warmup_steps` ramps both, in the role of DANN's coefficient schedule.

D's parameters are built by `prepare(width)` once the embedding width is known, trained by the run's
optimizer (as new layers: `trainer.head_lr_scale`) and saved in checkpoints with the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.distances import DISTANCES, Distance, _check_pair
from dmssl.errors import ConfigError


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """x forward; -coefficient * the incoming gradient backward."""
    return _ReverseGradient.apply(x, coefficient)


def domain_classifier(width: int, hidden_dim: int, layers: int) -> nn.Sequential:
    """`layers` hidden layers of `hidden_dim` with ReLU, then one logit. No batch norm: a step's two sides
    differ in size, and D must score each row on its own."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(width if i == 0 else hidden_dim, hidden_dim), nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(hidden_dim if layers else width, 1))
    return nn.Sequential(*blocks)


def adversarial_loss(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """L_adv above: D's balanced binary cross-entropy on reversed-gradient inputs."""
    _check_pair(x, y)
    logits_x = classifier(reverse_gradient(x, coefficient)).squeeze(1).float()
    logits_y = classifier(reverse_gradient(y, coefficient)).squeeze(1).float()
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_x, torch.ones_like(logits_x))
                  + F.binary_cross_entropy_with_logits(logits_y, torch.zeros_like(logits_y)))


@dataclass
class AdversarialOptions:
    hidden_dim: int = 256  # width of the domain classifier's hidden layers
    layers: int = 2  # hidden layers of the domain classifier (0: a logistic regression)
    coefficient: float = 1.0  # gradient reversal: the encoder receives -coefficient x D's gradient

    def validate(self) -> None:
        if self.hidden_dim < 1:
            raise ConfigError(f"distance.hidden_dim={self.hidden_dim} must be >= 1")
        if self.layers < 0:
            raise ConfigError(f"distance.layers={self.layers} must be >= 0")
        if not self.coefficient > 0:
            raise ConfigError(f"distance.coefficient={self.coefficient} must be > 0")


@DISTANCES.register("adversarial")
class Adversarial(Distance):
    """DANN's domain classifier through gradient reversal (see `adversarial_loss`)."""

    Options = AdversarialOptions
    learns = True

    def __init__(self, hidden_dim: int = 256, layers: int = 2, coefficient: float = 1.0) -> None:
        super().__init__()
        self.hidden_dim, self.layers, self.coefficient = hidden_dim, layers, coefficient
        self.classifier: nn.Module | None = None

    def prepare(self, width: int, num_classes: int = 0) -> None:
        self.classifier = domain_classifier(width, self.hidden_dim, self.layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.classifier is None:  # built lazily, it would be trained by no optimiser
            raise RuntimeError("Adversarial.prepare(width) builds the domain classifier; call it before the "
                               "optimiser is made, so that the optimiser trains it")
        return adversarial_loss(self.classifier, x, y, self.coefficient)
