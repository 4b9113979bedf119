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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.distances import Distance, build_distance
from dmssl.distributed import gather_with_grad
from dmssl.errors import ConfigError
from dmssl.losses import masked_cross_entropy, prototype_logits, weighted_supcon
from dmssl.pseudo_label import FixedThreshold, PseudoLabeller, build_pseudo_labeller
from dmssl.registry import Registry

if TYPE_CHECKING:
    from dmssl.config import Config

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
    # The linear classifier's logits of the same parts, for objectives with `head = "linear"`.
    labeled_logits: torch.Tensor | None = None
    weak_logits: torch.Tensor | None = None
    strong_logits: list[torch.Tensor] = field(default_factory=list)
    # The encoder's features (not normalised) of the same parts, for objectives whose `needs_features` is true.
    labeled_features: torch.Tensor | None = None
    weak_features: torch.Tensor | None = None
    strong_features: list[torch.Tensor] = field(default_factory=list)


def split_step(z: torch.Tensor, batch: dict[str, Any], views: tuple[str, ...], prototypes: torch.Tensor,
               logits: torch.Tensor | None = None, features: torch.Tensor | None = None) -> StepEmbeddings:
    """Cut a step's rows (labeled first, then each unlabeled view, in the order StepDataset built them)."""
    b = batch["labels"].shape[0]
    u = int(batch["num_unlabeled"])

    def parts_of(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        parts = list(rows[b:].split(u)) if views else []
        weak = parts[views.index("weak")] if "weak" in views else None
        strong = [part for part, view in zip(parts, views, strict=True) if view == "strong"]
        return rows[:b], weak, strong

    labeled, weak, strong = parts_of(z)
    emb = StepEmbeddings(labeled=labeled, labels=batch["labels"], prototypes=prototypes, weak=weak, strong=strong,
                         unlabeled_targets=batch["unlabeled_targets"] if views else None)
    if logits is not None:
        emb.labeled_logits, emb.weak_logits, emb.strong_logits = parts_of(logits)
    if features is not None:
        emb.labeled_features, emb.weak_features, emb.strong_features = parts_of(features)
    return emb


@dataclass
class ObjectiveOutput:
    """The loss to back-propagate and detached diagnostics (name -> 0-dim tensor)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


@dataclass
class SupervisedOptions:
    temperature: float = 0.1  # T of the prototype logits z . p / T (and of the contrastive loss)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature={self.temperature} must be > 0")


class Objective(nn.Module):
    """Base class: `forward(embeddings, step) -> ObjectiveOutput`.

    A subclass declares its `Options` dataclass (the `objective.*` keys it reads), the unlabeled views it
    needs, and whether it takes a distance. The pseudo-labeller (`pseudo_label.*`) is built by the caller
    and shared by every objective that uses unlabeled data.
    """

    Options: ClassVar[type] = SupervisedOptions
    unlabeled_views: ClassVar[tuple[str, ...]] = ()
    needs_distance: ClassVar[bool] = False
    head: ClassVar[str] = "prototype"  # or "linear": the model gets a linear classifier on encoder features

    @property
    def needs_features(self) -> bool:
        """Whether forward reads the encoder's features (StepEmbeddings.*_features) besides the embeddings."""
        return False

    def __init__(self, options: Any, num_classes: int, distance: Distance | None = None,
                 pseudo_labeller: PseudoLabeller | None = None, seed: int = 0) -> None:
        super().__init__()
        if self.needs_distance and distance is None:
            raise ValueError(f"objective {type(self).__name__} needs a distance")
        self.options = options
        self.num_classes = num_classes
        self.distance = distance if self.needs_distance else None
        # A submodule, so that checkpoints carry its running statistics with the objective's state.
        self.pseudo_labeller = pseudo_labeller if self.unlabeled_views else None
        self.seed = seed

    def prepare(self, model: nn.Module) -> None:
        """Build what depends on the model's sizes (a learning distance's parameters), before the optimiser."""

    def supervised_ce(self, emb: StepEmbeddings) -> torch.Tensor:
        return F.cross_entropy(prototype_logits(emb.labeled, emb.prototypes, self.options.temperature), emb.labels)

    def weak_logits(self, emb: StepEmbeddings) -> torch.Tensor:
        """The weak view's class logits, detached: the prototype classifier's (linear heads override)."""
        assert emb.weak is not None, "this objective needs the weak unlabeled view"
        return prototype_logits(emb.weak.detach(), emb.prototypes.detach(), self.options.temperature)

    def pseudo_label(self, emb: StepEmbeddings) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Targets and per-sample weights in [0, 1] from the weak view, with mask rate and accuracy logs."""
        assert self.pseudo_labeller is not None, "this objective needs a pseudo-labeller"
        logits = self.weak_logits(emb)
        result = self.pseudo_labeller(logits.float().softmax(dim=1))
        labels, weights = result.targets, result.weights
        logs = {"mask_rate": weights.mean(), **self.pseudo_labeller.logs()}
        if emb.unlabeled_targets is not None:
            known = (weights > 0) & (emb.unlabeled_targets >= 0)
            correct = ((labels == emb.unlabeled_targets) & known).float()
            logs["pseudo_label_accuracy"] = ((correct * weights).sum() / (weights * known).sum() if known.any()
                                             else torch.tensor(float("nan")))
        return labels, weights, logs

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        raise NotImplementedError


@OBJECTIVES.register("supervised")
class Supervised(Objective):
    """Cross-entropy of the prototype classifier on labeled data; unlabeled data is not used."""

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        ce = self.supervised_ce(emb)
        return ObjectiveOutput(ce, {"loss": ce.detach(), "loss_ce": ce.detach()})


@dataclass
class FixMatchOptions:
    lambda_u: float = 1.0  # weight of the unlabeled term mean_b w_b CE(strong_b, target_b)

    def validate(self) -> None:
        _non_negative(self, "lambda_u")


@OBJECTIVES.register("fixmatch")
class FixMatch(Objective):
    """The published FixMatch (Sohn et al., 2020): a linear classifier on the encoder's features.

    loss = CE(labeled) + lambda_u * mean_b w_b CE(strong view_b, pseudo-label_b), all on the linear
    logits; the pseudo-label and w_b come from the weak view's softmax through the pseudo-labeller.
    Test predictions are the linear classifier's argmax, so figures compare with USB's and the paper's.
    """

    Options = FixMatchOptions
    unlabeled_views = ("weak", "strong")
    head = "linear"

    def weak_logits(self, emb: StepEmbeddings) -> torch.Tensor:
        assert emb.weak_logits is not None, "fixmatch needs the linear logits (a model with linear_head=True)"
        return emb.weak_logits.detach()

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        assert emb.labeled_logits is not None and emb.strong_logits
        ce = F.cross_entropy(emb.labeled_logits, emb.labels)
        targets, weights, logs = self.pseudo_label(emb)
        unlabeled_ce = masked_cross_entropy(emb.strong_logits[0], targets, weights)
        # Zero times the unused embeddings and prototypes: each parameter is in the graph, as DDP requires.
        unused = 0.0 * (emb.labeled.sum() + emb.prototypes.sum())
        loss = ce + self.options.lambda_u * unlabeled_ce + unused
        logs.update(loss=loss.detach(), loss_ce=ce.detach(), loss_unlabeled=unlabeled_ce.detach())
        return ObjectiveOutput(loss, logs)


@dataclass
class PrototypeFixMatchOptions(SupervisedOptions):
    lambda_u: float = 1.0  # weight of the unlabeled term mean_b w_b CE(strong_b, target_b)

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "lambda_u")


@OBJECTIVES.register("fixmatch_proto")
class PrototypeFixMatch(Objective):
    """FixMatch's loss on the prototype (cosine) classifier z . p / T instead of a linear one."""

    Options = PrototypeFixMatchOptions
    unlabeled_views = ("weak", "strong")

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        ce = self.supervised_ce(emb)
        targets, weights, logs = self.pseudo_label(emb)
        strong_logits = prototype_logits(emb.strong[0], emb.prototypes, self.options.temperature)
        unlabeled_ce = masked_cross_entropy(strong_logits, targets, weights)
        loss = ce + self.options.lambda_u * unlabeled_ce
        logs.update(loss=loss.detach(), loss_ce=ce.detach(), loss_unlabeled=unlabeled_ce.detach())
        return ObjectiveOutput(loss, logs)


@dataclass
class ContrastiveOptions(SupervisedOptions):
    prototype_anchor_weight: float = 0.0  # prototypes as anchors (0: positives/negatives only)
    unconfident_weight: float = 1.0  # anchor weight of the SimCLR term of unconfident unlabeled views
    labeled_ce_weight: float = 0.0  # optional plain CE on labeled prototype logits

    def validate(self) -> None:
        super().validate()
        for key in ("prototype_anchor_weight", "unconfident_weight", "labeled_ce_weight"):
            _non_negative(self, key)


# An unlabeled view joins its pseudo-class when its weight reaches this: masks (0/1) behave as before,
# and a soft weight must mean "more likely right than not" before the view is another anchor's positive.
POSITIVE_WEIGHT = 0.5


@OBJECTIVES.register("sscl")
class SemiSupervisedContrastive(Objective):
    """One weighted SupCon loss over [prototypes; labeled; strong1; strong2] (Gauffre et al., 2024).

    Labels: prototypes 0..K-1, labeled y, an unlabeled view its pseudo-label where its pseudo-label
    weight w_b >= 0.5 (confident) and otherwise a unique id K + i shared by its two strong views only (a
    SimCLR pair). Anchor weights: prototypes `prototype_anchor_weight` (0: not anchors), labeled 1,
    confident w_b (1 for a mask), unconfident `unconfident_weight`. With only prototypes to compare
    against, a labeled anchor's term is exactly the prototype CE.
    """

    Options = ContrastiveOptions
    unlabeled_views = ("weak", "strong", "strong")

    def contrastive(self, emb: StepEmbeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        pseudo, pseudo_weights, logs = self.pseudo_label(emb)
        mask = pseudo_weights >= POSITIVE_WEIGHT
        k, u = self.num_classes, pseudo.shape[0]
        unique_ids = k + torch.arange(u, device=pseudo.device)
        unlabeled_labels = torch.where(mask, pseudo, unique_ids)
        labels = torch.cat([torch.arange(k, device=pseudo.device), emb.labels, unlabeled_labels, unlabeled_labels])
        unlabeled_weights = torch.where(mask, pseudo_weights, self.options.unconfident_weight).to(emb.labeled.dtype)
        weights = torch.cat([
            torch.full((k,), self.options.prototype_anchor_weight, device=pseudo.device, dtype=emb.labeled.dtype),
            torch.ones(emb.labeled.shape[0], device=pseudo.device, dtype=emb.labeled.dtype),
            unlabeled_weights, unlabeled_weights,
        ])
        embeddings = torch.cat([emb.prototypes, emb.labeled, emb.strong[0], emb.strong[1]])
        loss = weighted_supcon(embeddings, labels, weights, self.options.temperature)
        logs["loss_contrastive"] = loss.detach()
        if self.options.labeled_ce_weight > 0:
            ce = self.supervised_ce(emb)
            loss = loss + self.options.labeled_ce_weight * ce
            logs["loss_ce"] = ce.detach()
        return loss, pseudo, mask, logs

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        loss, _, _, logs = self.contrastive(emb)
        logs["loss"] = loss.detach()
        return ObjectiveOutput(loss, logs)


@dataclass
class DistributionMatchingOptions(ContrastiveOptions):
    lambda_dm: float = 1.0  # weight of the distribution-matching distance
    dm_views: Literal["weak", "strong", "both"] = "weak"  # unlabeled views matched to labeled
    class_conditional: bool = False  # match labeled class k to unlabeled pseudo-labeled k
    dm_warmup_steps: int = 0  # ramp lambda_dm linearly from 0 over this many steps
    labeled_memory: int = 0  # also match the last N labeled embeddings (detached, FIFO); 0: this step's only
    dm_space: Literal["projection", "features"] = "projection"  # match the unit embeddings z, or the encoder's features

    def validate(self) -> None:
        super().validate()
        _non_negative(self, "lambda_dm")
        _non_negative(self, "dm_warmup_steps")
        _non_negative(self, "labeled_memory")


@OBJECTIVES.register("dmssl")
class DistributionMatching(SemiSupervisedContrastive):
    """sscl + lambda_dm * D(Z_labeled, Z_unlabeled) (Nakayama & Okuda, arXiv:2601.04518).

    `dm_views` picks the unlabeled embeddings (weak, strong, or both); with `class_conditional`, D is
    averaged over classes k of D(labeled of class k, unlabeled confidently pseudo-labeled k), over
    the classes with at least two samples on each side. Embeddings are gathered from every process
    first, so the distance is that of the global batch. lambda_dm ramps up over `dm_warmup_steps`.

    With few labels a step's labeled side repeats the same handful of samples; `labeled_memory` = N adds
    the last N labeled embeddings (from earlier steps, detached, as HSR's memory of 128) to that side,
    so the labeled distribution is estimated from more draws. The gradient still flows through this
    step's embeddings only. The memory is a buffer: checkpoints carry it.

    `dm_space` = "features" matches the encoder's features (before the projection head) instead of the
    unit embeddings z: the matching gradient then reaches the encoder without passing through the head,
    and the kernel sees the space the classifier's input lives in rather than the contrastive sphere.
    """

    Options = DistributionMatchingOptions
    needs_distance = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("memory", torch.zeros(0, 0))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The memory's size is known only once it has been filled: take the saved one's shape.
        for name in ("memory", "memory_labels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def remember(self, labeled: torch.Tensor, labels: torch.Tensor) -> None:
        size = self.options.labeled_memory
        if self.memory.numel() == 0:
            self.memory = labeled.new_zeros(0, labeled.shape[1])
        self.memory = torch.cat([self.memory.to(labeled), labeled.detach()])[-size:]
        self.memory_labels = torch.cat([self.memory_labels.to(labels.device), labels])[-size:]

    @property
    def needs_features(self) -> bool:
        return self.options.dm_space == "features"

    def prepare(self, model: nn.Module) -> None:
        assert self.distance is not None
        width = model.encoder.feature_dim if self.needs_features else model.prototype_weights.shape[1]
        self.distance.prepare(width, self.num_classes)

    def sides_for_matching(self, emb: StepEmbeddings, features: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(labeled, unlabeled) rows in the matching space (or, with `features` given, in that one); the
        unlabeled views that `dm_views` picks."""
        if self.needs_features if features is None else features:
            labeled, weak, strong = emb.labeled_features, emb.weak_features, emb.strong_features
            assert labeled is not None, "dm_space=features needs split_step(..., features=...)"
        else:
            labeled, weak, strong = emb.labeled, emb.weak, emb.strong
        assert weak is not None
        if self.options.dm_views == "weak":
            return labeled, weak
        if self.options.dm_views == "strong":
            return labeled, torch.cat(strong)
        return labeled, torch.cat([weak, *strong])

    def probabilities(self, rows: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """The prototype classifier's class probabilities of embeddings `rows`, detached."""
        return prototype_logits(rows.detach(), prototypes.detach(), self.options.temperature).float().softmax(1)

    def match(self, emb: StepEmbeddings, pseudo: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        labeled, unlabeled = self.sides_for_matching(emb)
        labeled, unlabeled = gather_with_grad(labeled), gather_with_grad(unlabeled)
        labels = gather_with_grad(emb.labels.unsqueeze(1).float()).squeeze(1).long()
        conditioned = self.distance.conditions_on_predictions
        if conditioned:  # the prediction of each matched row, from its embedding z (CDAN's g)
            z_labeled, z_unlabeled = ((labeled, unlabeled) if not self.needs_features else
                                      map(gather_with_grad, self.sides_for_matching(emb, features=False)))
            p_labeled = self.probabilities(z_labeled, emb.prototypes)
            p_unlabeled = self.probabilities(z_unlabeled, emb.prototypes)
        if self.options.labeled_memory:
            current, current_labels = labeled, labels
            if self.memory.numel():
                labeled = torch.cat([labeled, self.memory.to(labeled)])
                if conditioned:  # memory rows are embeddings z here (check_methods_fit refuses features)
                    p_labeled = torch.cat([p_labeled, self.probabilities(self.memory.to(labeled), emb.prototypes)])
            labels = torch.cat([labels, self.memory_labels.to(labels.device)])
            self.remember(current, current_labels)
        # The same directions on every process and at every resume: seeded by (seed, step).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)

        def distance(x_rows: torch.Tensor, y_rows: torch.Tensor) -> torch.Tensor:
            if not conditioned:
                return self.distance(labeled[x_rows], unlabeled[y_rows], generator=generator)
            return self.distance(labeled[x_rows], unlabeled[y_rows], generator=generator,
                                 x_probabilities=p_labeled[x_rows], y_probabilities=p_unlabeled[y_rows])

        if not self.options.class_conditional:
            return distance(slice(None), slice(None))
        copies = unlabeled.shape[0] // pseudo.shape[0] if pseudo.shape[0] else 1
        pseudo_all = gather_with_grad(torch.where(mask, pseudo, -1).unsqueeze(1).float()).squeeze(1).long()
        pseudo_all = pseudo_all.repeat(copies)
        terms = []
        for k in range(self.num_classes):
            x_rows, y_rows = labels == k, pseudo_all == k
            if int(x_rows.sum()) >= 2 and int(y_rows.sum()) >= 2:
                terms.append(distance(x_rows, y_rows))
        return torch.stack(terms).mean() if terms else labeled.sum() * 0.0

    def matching_weight(self, step: int) -> float:
        """lambda_dm at `step`: ramped linearly from 0 over `dm_warmup_steps`."""
        warmup = self.options.dm_warmup_steps
        return self.options.lambda_dm * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def forward(self, emb: StepEmbeddings, step: int) -> ObjectiveOutput:
        loss, pseudo, mask, logs = self.contrastive(emb)
        distance = self.match(emb, pseudo, mask, step)
        weighted = self.matching_weight(step) * distance
        loss = loss + weighted
        logs.update(loss=loss.detach(), distance=distance.detach(), loss_dm=weighted.detach())
        return ObjectiveOutput(loss, logs)


def build_objective(name: str, options: Any = None, num_classes: int = 2, distance: Distance | None = None,
                    pseudo_labeller: PseudoLabeller | None = None, seed: int = 0) -> Objective:
    """The registered objective `name` with its Options (defaults when None).

    Without a pseudo-labeller, one that uses unlabeled data gets FixMatch's fixed 0.95 threshold.
    """
    cls = OBJECTIVES.get(name)
    if pseudo_labeller is None and cls.unlabeled_views:
        pseudo_labeller = FixedThreshold(FixedThreshold.Options(), num_classes)
    return cls(options if options is not None else cls.Options(), num_classes, distance, pseudo_labeller, seed)


def embed_step(model: Any, objective: Objective, batch: dict[str, Any], prototypes: torch.Tensor) -> StepEmbeddings:
    """One forward pass of `model` over every row of the step, cut into its parts, with the linear head's
    logits and the encoder's features where `objective` reads them.

    `model` may be wrapped (DDP, autocast); `prototypes` are the unwrapped model's.
    """
    linear, features = objective.head == "linear", objective.needs_features
    if not (linear or features):
        return split_step(model(batch["inputs"]), batch, objective.unlabeled_views, prototypes)
    z, *extra = model(batch["inputs"], with_logits=linear, with_features=features)
    return split_step(z, batch, objective.unlabeled_views, prototypes, extra[0] if linear else None,
                      extra[-1] if features else None)


def run_objective(model: Any, objective: Objective, batch: dict[str, Any], step: int,
                  prototypes: torch.Tensor) -> ObjectiveOutput:
    """The objective on one step's forward pass (`embed_step`)."""
    return objective(embed_step(model, objective, batch, prototypes), step)


def objective_from_config(cfg: Config, num_classes: int) -> Objective:
    """The run's objective with its pseudo-labeller and, if it takes one, its distance: the one place they are built."""
    cls = OBJECTIVES.get(cfg.objective.name)
    distance = build_distance(cfg.distance.name, cfg.distance.options) if cls.needs_distance else None
    labeller = build_pseudo_labeller(cfg.pseudo_label.name, cfg.pseudo_label.options, num_classes)
    return build_objective(cfg.objective.name, cfg.objective.options, num_classes, distance, labeller, cfg.seed)


def _non_negative(options: Any, key: str) -> None:
    if getattr(options, key) < 0:
        raise ConfigError(f"objective.{key}={getattr(options, key)} must be >= 0")
