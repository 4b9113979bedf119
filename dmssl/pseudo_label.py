"""Pseudo-labellers: from the weak view's class probabilities to a target and a weight per unlabeled sample.

    fixed      w_b = 1[max_c q_b(c) >= tau]                                           [Sohn 2020, FixMatch]
    freematch  w_b = 1[max_c q_b(c) >= tau_t(argmax_c q_b(c))], an adaptive, class-wise tau_t   [Wang 2023]
    softmatch  w_b = 1 if max q_b >= mu_t else exp(-(max q_b - mu_t)^2 / (2 sigma2_t / n_sigma^2))  [Chen 2023]

q_b is the weak view's class distribution (softmax of the prototype or linear logits), C the number of
classes, m the momentum of the running statistics. Each labeller is also a module with buffers, so its
running statistics are saved in checkpoints with the objective and a resumed run continues them.

Distribution alignment is an option of each (`distribution_alignment`): before anything else,
q_b <- normalise(q_b * (1/C) / E[q]), E[q] a running mean of the batch-mean prediction (ReMixMatch's
rule with a uniform target; SoftMatch's "uniform alignment"). The running statistics are means over
every process's batch, so several processes agree.

How the weight enters the losses (docs/objectives.md): FixMatch's unlabeled term is
mean_b w_b CE(strong_b, target_b); in sscl/dmssl an unlabeled view with w_b >= 0.5 joins its
pseudo-class's positive set and is an anchor of weight w_b, the others are SimCLR pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dmssl.distributed import mean_over_processes, world_size
from dmssl.errors import ConfigError
from dmssl.registry import Registry

PSEUDO_LABELLERS: Registry[type[PseudoLabeller]] = Registry("pseudo-labeller")


@dataclass
class PseudoLabels:
    """targets (N,) class ids; weights (N,) in [0, 1]; confidence (N,) max probability after alignment."""

    targets: torch.Tensor
    weights: torch.Tensor
    confidence: torch.Tensor


@dataclass
class AlignmentOptions:
    distribution_alignment: bool = False  # q <- normalise(q * uniform / running mean of q) before labelling
    alignment_momentum: float = 0.999  # of the running mean of the weak-view predictions

    def validate(self) -> None:
        if not 0.0 <= self.alignment_momentum < 1.0:
            raise ConfigError(f"pseudo_label.alignment_momentum={self.alignment_momentum} must be in [0, 1)")


class PseudoLabeller(nn.Module):
    """Base class: `forward(probs) -> PseudoLabels`, updating the running statistics (training only)."""

    Options: ClassVar[type] = AlignmentOptions

    def __init__(self, options: AlignmentOptions, num_classes: int) -> None:
        super().__init__()
        self.options, self.num_classes = options, num_classes
        self.register_buffer("prediction_mean", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def align(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.options.distribution_alignment:
            return probs
        m = self.options.alignment_momentum
        batch_mean = mean_over_processes(probs.mean(dim=0))
        self.prediction_mean = m * self.prediction_mean.to(probs.device) + (1 - m) * batch_mean
        aligned = probs * ((1.0 / self.num_classes) / self.prediction_mean.clamp_min(1e-6))
        return aligned / aligned.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> PseudoLabels:
        probs = self.align(probs.detach().float())
        confidence, targets = probs.max(dim=1)
        return PseudoLabels(targets, self.weights(probs, confidence, targets), confidence)

    def weights(self, probs: torch.Tensor, confidence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logs(self) -> dict[str, torch.Tensor]:
        """Running statistics worth plotting (0-dim tensors)."""
        if self.options.distribution_alignment:
            return {"prediction_max_share": self.prediction_mean.max()}
        return {}


@dataclass
class FixedOptions(AlignmentOptions):
    threshold: float = 0.95  # FixMatch's tau on the weak view's max class probability

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"pseudo_label.threshold={self.threshold} must be in (0, 1]")


@PSEUDO_LABELLERS.register("fixed")
class FixedThreshold(PseudoLabeller):
    """FixMatch: weight 1 where the max probability reaches `threshold`, else 0."""

    Options = FixedOptions

    def weights(self, probs: torch.Tensor, confidence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (confidence >= self.options.threshold).float()


@dataclass
class FreeMatchOptions(AlignmentOptions):
    momentum: float = 0.999  # m of the global threshold tau_t and the class means p_t(c)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"pseudo_label.momentum={self.momentum} must be in [0, 1)")


@PSEUDO_LABELLERS.register("freematch")
class FreeMatchThreshold(PseudoLabeller):
    """FreeMatch's self-adaptive threshold (Wang et al., ICLR 2023), global and class-wise.

        tau_t    = m tau_{t-1} + (1 - m) mean_b max_c q_b(c),            tau_0 = 1/C
        p_t(c)   = m p_{t-1}(c) + (1 - m) mean_b q_b(c),                 p_0(c) = 1/C
        tau_t(c) = p_t(c) / max_c' p_t(c') * tau_t
        w_b      = 1[max_c q_b(c) >= tau_t(argmax_c q_b(c))]

    The statistics are updated with this batch before the mask is taken (as the paper's Algorithm 1).
    The paper's self-adaptive fairness term is not included.
    """

    Options = FreeMatchOptions

    def __init__(self, options: FreeMatchOptions, num_classes: int) -> None:
        super().__init__(options, num_classes)
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_mean", torch.full((num_classes,), 1.0 / num_classes))

    def class_thresholds(self) -> torch.Tensor:
        return self.class_mean / self.class_mean.max() * self.global_threshold

    def weights(self, probs: torch.Tensor, confidence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.options.momentum
        self.global_threshold = m * self.global_threshold.to(probs.device) + (1 - m) * mean_over_processes(confidence.mean())
        self.class_mean = m * self.class_mean.to(probs.device) + (1 - m) * mean_over_processes(probs.mean(dim=0))
        return (confidence >= self.class_thresholds()[targets]).float()

    def logs(self) -> dict[str, torch.Tensor]:
        return super().logs() | {"threshold": self.global_threshold.clone()}


@dataclass
class SoftMatchOptions(AlignmentOptions):
    distribution_alignment: bool = True  # SoftMatch's uniform alignment, on by default as in the paper
    momentum: float = 0.999  # m of the running mean mu_t and variance sigma2_t of the confidence
    n_sigma: float = 2.0  # the Gaussian's width is sigma_t / n_sigma (USB's default 2)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"pseudo_label.momentum={self.momentum} must be in [0, 1)")
        if self.n_sigma <= 0:
            raise ConfigError(f"pseudo_label.n_sigma={self.n_sigma} must be > 0")


@PSEUDO_LABELLERS.register("softmatch")
class SoftMatchWeights(PseudoLabeller):
    """SoftMatch's truncated-Gaussian weights (Chen et al., ICLR 2023).

        mu_t     = m mu_{t-1} + (1 - m) mean_b max q_b,                  mu_0 = 1/C
        sigma2_t = m sigma2_{t-1} + (1 - m) var_b max q_b (unbiased),    sigma2_0 = 1
        w_b      = 1 if max q_b >= mu_t, else exp(-(max q_b - mu_t)^2 / (2 sigma2_t / n_sigma^2))
    """

    Options = SoftMatchOptions

    def __init__(self, options: SoftMatchOptions, num_classes: int) -> None:
        super().__init__(options, num_classes)
        self.register_buffer("confidence_mean", torch.tensor(1.0 / num_classes))
        self.register_buffer("confidence_var", torch.tensor(1.0))

    def weights(self, probs: torch.Tensor, confidence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.options.momentum
        mean = mean_over_processes(confidence.mean())
        # The unbiased variance over the global batch, from the processes' mean square.
        count = confidence.numel() * world_size()
        square = mean_over_processes((confidence ** 2).mean())
        var = (square - mean ** 2) * (count / max(count - 1, 1)) if count > 1 else torch.zeros_like(mean)
        self.confidence_mean = m * self.confidence_mean.to(probs.device) + (1 - m) * mean
        self.confidence_var = m * self.confidence_var.to(probs.device) + (1 - m) * var
        width = 2 * self.confidence_var.clamp_min(1e-12) / self.options.n_sigma ** 2
        soft = torch.exp(-((confidence - self.confidence_mean) ** 2) / width)
        return torch.where(confidence >= self.confidence_mean, torch.ones_like(soft), soft)

    def logs(self) -> dict[str, torch.Tensor]:
        return super().logs() | {"threshold": self.confidence_mean.clone(),
                                 "confidence_std": self.confidence_var.sqrt()}


def build_pseudo_labeller(name: str, options: AlignmentOptions | None, num_classes: int) -> PseudoLabeller:
    cls = PSEUDO_LABELLERS.get(name)
    return cls(options if options is not None else cls.Options(), num_classes)

