"""The network: the adapter's encoder, a projection head, and one learnable prototype per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.modality import Batch


class SSLModel(nn.Module):
    """encoder -> MLP head -> L2-normalised embedding z; prototypes P (K, d), also unit-norm.

    Class scores are cosine similarities z . p_k; the prediction is the nearest prototype, so no
    separate linear classifier is needed (Gauffre et al., 2024). Every objective, baselines included,
    uses this one model, so comparisons differ only in the loss.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, proj_hidden_dim: int = 128, proj_dim: int = 128) -> None:
        super().__init__()
        feature_dim = getattr(encoder, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim <= 0:
            raise ValueError(f"the encoder must expose a positive int `feature_dim`, got {feature_dim!r}")
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(feature_dim, proj_hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden_dim, proj_dim))
        self.prototype_weights = nn.Parameter(torch.randn(num_classes, proj_dim))

    @property
    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototype_weights, dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """batch -> (B, proj_dim) unit embeddings."""
        features = self.encoder(batch)
        return F.normalize(self.head(features).float(), dim=1)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """batch -> (B,) class indices (nearest prototype)."""
        return (self.forward(batch) @ self.prototypes.T).argmax(dim=1)
