"""The network: the adapter's encoder, a projection head, and one learnable prototype per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.modality import Batch, Modality


class CachedInputs(dict):
    """A batch of cached encoder outputs (dmssl/feature_cache.py): `{"features": (B, feature_dim)}`, for which the
    model skips its frozen encoder, or `{"hidden": (B, ...), "prefix_blocks": n}`, the outputs of its frozen
    lower n blocks, from which it runs the rest (`encoder.encode_from`). A dict, so that device moves and
    DataLoader collation keep its type."""


class SSLModel(nn.Module):
    """encoder -> MLP head -> L2-normalised embedding z; prototypes P (K, d), also unit-norm.

    Class scores are cosine similarities z . p_k; the prediction is the nearest prototype, so no
    separate linear classifier is needed (Gauffre et al., 2024). Every objective, baselines included,
    uses this one model, so comparisons differ only in the loss.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, proj_hidden_dim: int = 128, proj_dim: int = 128,
                 linear_head: bool = False) -> None:
        super().__init__()
        feature_dim = getattr(encoder, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim <= 0:
            raise ValueError(f"the encoder must expose a positive int `feature_dim`, got {feature_dim!r}")
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(feature_dim, proj_hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden_dim, proj_dim))
        self.prototype_weights = nn.Parameter(torch.randn(num_classes, proj_dim))
        # The published FixMatch's classifier: linear on the encoder's features, for objectives that ask for it.
        # Created last, so that a model without it initialises exactly as before.
        self.classifier = nn.Linear(feature_dim, num_classes) if linear_head else None

    @property
    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototype_weights, dim=1)

    def forward(self, batch: Batch, with_logits: bool = False,
                with_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """batch -> (B, proj_dim) unit embeddings z; with `with_logits`, also the linear classifier's (B, K)
        logits; with `with_features`, also the encoder's (B, feature_dim) features: (z, [logits], [features])."""
        if isinstance(batch, CachedInputs):
            features = (batch["features"] if "features" in batch
                        else self.encoder.encode_from(batch["hidden"], int(batch["prefix_blocks"])))
        else:
            features = self.encoder(batch)
        z = F.normalize(self.head(features).float(), dim=1)
        if not (with_logits or with_features):
            return z
        out = [z]
        if with_logits:
            if self.classifier is None:
                raise ValueError("with_logits=True needs a model built with linear_head=True")
            out.append(self.classifier(features).float())
        if with_features:
            out.append(features.float())
        return tuple(out)

    def class_logits(self, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings z, (B, K) logits): the linear classifier's where there is one, else z . p / temperature,
        the prototype logits the objectives train (their softmax is the model's class probability)."""
        if self.classifier is not None:
            return self.forward(batch, with_logits=True)
        z = self.forward(batch)
        return z, z @ self.prototypes.T / temperature

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """batch -> (B,) class indices: the linear classifier's where there is one, else the nearest prototype."""
        if self.classifier is not None:
            return self.forward(batch, with_logits=True)[1].argmax(dim=1)
        return (self.forward(batch) @ self.prototypes.T).argmax(dim=1)


@torch.no_grad()
def init_prototypes_from_labeled(model: SSLModel, adapter: Modality, samples: list, labels: list[int],
                                 batch_size: int = 256) -> None:
    """Prototype k := the normalised mean embedding (test views, eval mode) of the labeled samples of class k.

    With a pretrained encoder the first pseudo-labels then come from a nearest-class-mean classifier on the
    labeled data rather than from random directions; a class without labeled samples keeps its random
    prototype. Deterministic and free of random draws, so a resumed run (which loads the prototypes from
    its checkpoint anyway) stays bit-exact.
    """
    was_training = model.training
    model.eval()
    parts = [model(adapter.collate([adapter.test_view(s) for s in samples[i: i + batch_size]]))
             for i in range(0, len(samples), batch_size)]
    model.train(was_training)
    z, y = torch.cat(parts).float(), torch.as_tensor(labels)
    for k in range(model.prototype_weights.shape[0]):
        if (y == k).any():
            model.prototype_weights[k] = F.normalize(z[y == k].mean(dim=0), dim=0).to(model.prototype_weights)
