"""A toy distance and a toy objective, each one class in this one file: what extending dmssl takes.

Used by tests/test_extending.py as `python train.py plugins=[tests.toy_methods] distance.name=toy ...`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dmssl.distances import DISTANCES, Distance
from dmssl.losses import prototype_logits
from dmssl.objective import OBJECTIVES, Objective, ObjectiveOutput, SupervisedOptions


@dataclass
class ToyDistanceOptions:
    scale: float = 1.0  # multiplies the squared distance between the two means


@DISTANCES.register("toy")
class ToyDistance(Distance):
    """scale * ||mean(x) - mean(y)||^2: the simplest moment-matching distance."""

    Options = ToyDistanceOptions

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.scale * (x.mean(0) - y.mean(0)).pow(2).sum()


@dataclass
class SmoothedOptions(SupervisedOptions):
    smoothing: float = 0.1  # label smoothing of the labeled cross-entropy


@OBJECTIVES.register("toy_smoothed")
class SmoothedSupervised(Objective):
    """Labeled cross-entropy with label smoothing; unlabeled data is not used."""

    Options = SmoothedOptions

    def forward(self, emb, step):
        logits = prototype_logits(emb.labeled, emb.prototypes, self.options.temperature)
        loss = F.cross_entropy(logits, emb.labels, label_smoothing=self.options.smoothing)
        return ObjectiveOutput(loss, {"loss": loss.detach()})
