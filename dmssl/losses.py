"""Loss pieces as pure functions: prototype logits, pseudo-labels, the weighted contrastive loss.

References:
    - [0] Sohn et al., "FixMatch", NeurIPS 2020 (confidence-thresholded pseudo-labels).
    - [1] Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (SupCon).
    - [2] Gauffre, Horvat & Amini, "A Unified Contrastive Loss for Self-Training", ECML-PKDD 2024
          (prototypes as positives, unconfident samples as SimCLR pairs, per-anchor weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, d) unit embeddings, (K, d) unit prototypes -> (B, K) logits z . p_k / T (a cosine classifier)."""
    return z @ prototypes.T / temperature


def pseudo_labels(logits: torch.Tensor, threshold: float,
                  class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's rule on (N, K) logits: (labels, confident mask, max probability), all without gradient.

    Gauffre et al.'s p = softmax(((S + 1) / 2) / 0.055) on cosine similarities S is the same as
    softmax(S / 0.11), i.e. these logits with temperature 0.11. `class_weights` (K,), if given,
    multiply the probabilities before they are renormalised (distribution alignment).
    """
    probs = logits.detach().float().softmax(dim=1)
    if class_weights is not None:
        probs = align_distribution(probs, class_weights)
    confidence, labels = probs.max(dim=1)
    return labels, confidence >= threshold, confidence


def align_distribution(probs: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """(N, K) probabilities times (K,) weights, renormalised per row (ReMixMatch's distribution alignment,
    with weights = target class distribution / running mean of the model's predictions)."""
    aligned = probs * class_weights.to(probs.device, probs.dtype)
    return aligned / aligned.sum(dim=1, keepdim=True)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all N rows of CE * mask (FixMatch divides by N, not by the number kept)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return (F.cross_entropy(logits, targets, reduction="none") * mask.float()).mean()


def weighted_supcon(embeddings: torch.Tensor, labels: torch.Tensor, anchor_weights: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Supervised contrastive loss with per-anchor weights.

    For anchor i with positives P(i) = {p != i : labels[p] == labels[i]}:
        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i . z_p / T) / sum_{a != i} exp(z_i . z_a / T) )
    and the loss is sum_i w_i l_i / sum_i w_i over anchors with w_i > 0 and at least one positive.
    Give each unconfident unlabeled pair a label of its own and its two views are each other's only
    positive (SimCLR); give prototypes weight 0 and they are positives and negatives but not anchors.

    Args:
        embeddings: (N, d), L2-normalised.
        labels: (N,) integers.
        anchor_weights: (N,) non-negative.
    """
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],) or anchor_weights.shape != labels.shape:
        raise ValueError(f"shapes: embeddings {tuple(embeddings.shape)}, labels {tuple(labels.shape)}, "
                         f"weights {tuple(anchor_weights.shape)}")
    n = embeddings.shape[0]
    similarity = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    num_positives = positives.sum(1)
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / num_positives.clamp_min(1)
    weights = anchor_weights * (num_positives > 0)
    total = weights.sum()
    if total <= 0:
        return embeddings.sum() * 0.0
    return (per_anchor * weights).sum() / total
