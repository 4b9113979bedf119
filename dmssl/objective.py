"""Objectives: the dmssl method and its baselines, from the same pieces.

    supervised   CE of the prototype classifier on labeled data
    fixmatch     + lambda_u * CE(strong view, confident weak-view pseudo-label)        [Sohn 2020]
    sscl         one contrastive loss over {prototypes, labeled, strong1, strong2}     [Gauffre 2024]
    dmssl        sscl + lambda_dm * D(labeled embeddings, unlabeled embeddings)        [Nakayama 2026]

Each objective declares which unlabeled views it needs (`unlabeled_views`), so the data pipeline
builds and the encoder runs only those: a supervised baseline costs a supervised step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.config import ObjectiveConfig
from dmssl.dist import gather_with_grad, mean_over_processes
from dmssl.distances import Distance
from dmssl.losses import masked_cross_entropy, prototype_logits, pseudo_labels, weighted_supcon
from dmssl.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass
class StepEmbeddings:
    """L2-normalised embeddings of one training step.

    Attributes:
        labeled: (B, d) embeddings of the labeled samples' weak views.
        labels: (B,) their classes.
        prototypes: (K, d) class prototypes.
        weak: (U, d) weak views of the unlabeled samples, or None if the objective needs none.
        strong: list of (U, d) strong views (as many as the objective asked for).
        unlabeled_targets: (U,) true classes of the unlabeled samples where known, else -1;
            used only for the pseudo-label accuracy diagnostic, never for training.
    """

    labeled: torch.Tensor
    labels: torch.Tensor
    prototypes: torch.Tensor
    weak: torch.Tensor | None = None
    strong: list[torch.Tensor] = field(default_factory=list)
    unlabeled_targets: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """The loss to back-propagate and detached diagnostics (name -> 0-dim tensor)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class: `forward(embeddings, step) -> ObjectiveOutput`."""

    unlabeled_views: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, distance: Distance | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.distance = distance
        self.seed = seed
        # Running mean of the weak-view class probabilities; a buffer so that checkpoints carry it.
        self.register_buffer("prediction_mean", torch.full((num_classes,), 1.0 / num_classes))

    def supervised_ce(self, emb: StepEmbeddings) -> torch.Tensor:
        return F.cross_entropy(prototype_logits(emb.labeled, emb.prototypes, self.cfg.temperature), emb.labels)

    def pseudo_label(self, emb: StepEmbeddings) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Pseudo-labels and confidence mask from the weak view, with mask rate and accuracy logs."""
        assert emb.weak is not None, "this objective needs the weak unlabeled view"
        logits = prototype_logits(emb.weak.detach(), emb.prototypes.detach(), self.cfg.temperature)
        class_weights = self.update_alignment(logits) if self.cfg.distribution_alignment else None
        labels, mask, _ = pseudo_labels(logits, self.cfg.pseudo_label_threshold, class_weights)
        logs = {"mask_rate": mask.float().mean()}
        if class_weights is not None:
            logs["prediction_max_share"] = self.prediction_mean.max()
        if emb.unlabeled_targets is not None:
            known = mask & (emb.unlabeled_targets >= 0)
            correct = (labels == emb.unlabeled_targets) & known
            logs["pseudo_label_accuracy"] = correct.sum() / known.sum() if known.any() else torch.tensor(float("nan"))
        return labels, mask, logs

    @torch.no_grad()
    def update_alignment(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold this step's mean prediction (over all processes) into the running mean; return the
        class weights uniform / running mean."""
        batch_mean = mean_over_processes(logits.float().softmax(dim=1).mean(dim=0))
        m = self.cfg.alignment_momentum
        self.prediction_mean = m * self.prediction_mean.to(batch_mean.device) + (1 - m) * batch_mean
        return (1.0 / self.num_classes) / self.prediction_mean.clamp_min(1e-6)

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        raise NotImplementedError


@OBJECTIVES.register("supervised")
class Supervised(Objective):
    """Cross-entropy of the prototype classifier on labeled data; unlabeled data is not used."""

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        ce = self.supervised_ce(emb)
        return ObjectiveOutput(ce, {"loss": ce.detach(), "loss_ce": ce.detach()})


@OBJECTIVES.register("fixmatch")
class FixMatch(Objective):
    """Labeled CE + lambda_u * CE of a strong view against the confident weak-view pseudo-label."""

    unlabeled_views = ("weak", "strong")

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        ce = self.supervised_ce(emb)
        targets, mask, logs = self.pseudo_label(emb)
        strong_logits = prototype_logits(emb.strong[0], emb.prototypes, self.cfg.temperature)
        unlabeled_ce = masked_cross_entropy(strong_logits, targets, mask)
        loss = ce + self.cfg.lambda_u * unlabeled_ce
        logs.update(loss=loss.detach(), loss_ce=ce.detach(), loss_unlabeled=unlabeled_ce.detach())
        return ObjectiveOutput(loss, logs)


@OBJECTIVES.register("sscl")
class SemiSupervisedContrastive(Objective):
    """One weighted SupCon loss over [prototypes; labeled; strong1; strong2] (Gauffre et al., 2024).

    Labels: prototypes 0..K-1, labeled y, unlabeled the pseudo-label where confident and otherwise a
    unique id K + i shared by its two strong views only (a SimCLR pair). Anchor weights: prototypes
    `prototype_anchor_weight` (0: not anchors), labeled 1, confident 1, unconfident `unconfident_weight`.
    With only prototypes to compare against, a labeled anchor's term is exactly the prototype CE.
    """

    unlabeled_views = ("weak", "strong", "strong")

    def contrastive(self, emb: StepEmbeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        pseudo, mask, logs = self.pseudo_label(emb)
        k, u = self.num_classes, pseudo.shape[0]
        unique_ids = k + torch.arange(u, device=pseudo.device)
        unlabeled_labels = torch.where(mask, pseudo, unique_ids)
        labels = torch.cat([torch.arange(k, device=pseudo.device), emb.labels, unlabeled_labels, unlabeled_labels])
        unlabeled_weights = torch.where(mask, 1.0, self.cfg.unconfident_weight).to(emb.labeled.dtype)
        weights = torch.cat([
            torch.full((k,), self.cfg.prototype_anchor_weight, device=pseudo.device, dtype=emb.labeled.dtype),
            torch.ones(emb.labeled.shape[0], device=pseudo.device, dtype=emb.labeled.dtype),
            unlabeled_weights, unlabeled_weights,
        ])
        embeddings = torch.cat([emb.prototypes, emb.labeled, emb.strong[0], emb.strong[1]])
        loss = weighted_supcon(embeddings, labels, weights, self.cfg.temperature)
        logs["loss_contrastive"] = loss.detach()
        if self.cfg.labeled_ce_weight > 0:
            ce = self.supervised_ce(emb)
            loss = loss + self.cfg.labeled_ce_weight * ce
            logs["loss_ce"] = ce.detach()
        return loss, pseudo, mask, logs

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        loss, _, _, logs = self.contrastive(emb)
        logs["loss"] = loss.detach()
        return ObjectiveOutput(loss, logs)


@OBJECTIVES.register("dmssl")
class DistributionMatching(SemiSupervisedContrastive):
    """sscl + lambda_dm * D(Z_labeled, Z_unlabeled) (Nakayama & Okuda, arXiv:2601.04518).

    `dm_views` picks the unlabeled embeddings (weak, strong, or both); with `class_conditional`, D is
    averaged over classes k of D(labeled of class k, unlabeled confidently pseudo-labeled k), over
    the classes with at least two samples on each side. Embeddings are gathered from every process
    first, so the distance is that of the global batch. lambda_dm ramps up over `dm_warmup_steps`.
    """

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, distance: Distance | None = None,
                 seed: int = 0) -> None:
        if distance is None:
            raise ValueError("objective dmssl needs a distance")
        super().__init__(cfg, num_classes, distance, seed)

    def unlabeled_for_matching(self, emb: StepEmbeddings) -> torch.Tensor:
        assert emb.weak is not None
        if self.cfg.dm_views == "weak":
            return emb.weak
        if self.cfg.dm_views == "strong":
            return torch.cat(emb.strong)
        return torch.cat([emb.weak, *emb.strong])

    def match(self, emb: StepEmbeddings, pseudo: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        labeled = gather_with_grad(emb.labeled)
        unlabeled = gather_with_grad(self.unlabeled_for_matching(emb))
        # The same directions on every process and at every resume: seeded by (seed, step).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if not self.cfg.class_conditional:
            return self.distance(labeled, unlabeled, generator=generator)
        copies = unlabeled.shape[0] // pseudo.shape[0] if pseudo.shape[0] else 1
        labels = gather_with_grad(emb.labels.unsqueeze(1).float()).squeeze(1).long()
        pseudo_all = gather_with_grad(torch.where(mask, pseudo, -1).unsqueeze(1).float()).squeeze(1).long()
        pseudo_all = pseudo_all.repeat(copies)
        terms = []
        for k in range(self.num_classes):
            x, y = labeled[labels == k], unlabeled[pseudo_all == k]
            if x.shape[0] >= 2 and y.shape[0] >= 2:
                terms.append(self.distance(x, y, generator=generator))
        return torch.stack(terms).mean() if terms else labeled.sum() * 0.0

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        loss, pseudo, mask, logs = self.contrastive(emb)
        ramp = min(1.0, (step + 1) / self.cfg.dm_warmup_steps) if self.cfg.dm_warmup_steps else 1.0
        distance = self.match(emb, pseudo, mask, step)
        loss = loss + self.cfg.lambda_dm * ramp * distance
        logs.update(loss=loss.detach(), distance=distance.detach(),
                    loss_dm=(self.cfg.lambda_dm * ramp * distance).detach())
        return ObjectiveOutput(loss, logs)


def build_objective(cfg: ObjectiveConfig, num_classes: int, distance: Distance | None, seed: int = 0) -> Objective:
    """The registered objective `cfg.name`; the distance is used by dmssl only."""
    return OBJECTIVES.get(cfg.name)(cfg, num_classes, distance if cfg.name == "dmssl" else None, seed)
