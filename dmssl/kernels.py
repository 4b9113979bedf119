"""Kernels for MMD: each maps two sets of vectors to their (n, m) Gram matrix.

Which kernel suits which embeddings is a modality's choice (set in its recipe or adapter defaults),
never the trainer's. Distance-based kernels take explicit bandwidths, or `None` for the median
heuristic: the median of the pairwise squared distances among the inputs (detached, so the bandwidth
is a statistic of the batch, not something the model can game), times each of `median_scales`.
Several bandwidths are averaged, so k(a, a) = 1 for the Gaussian, IMQ and Laplacian kernels.

References:
    - [0] Gretton et al., "A Kernel Two-Sample Test", JMLR 2012 (median heuristic, MMD).
    - [1] Gorham & Mackey, "Measuring Sample Quality with Kernels", ICML 2017 (IMQ kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmssl.registry import Registry

KERNELS: Registry[type[Kernel]] = Registry("kernel")


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, d), (m, d) -> (n, m) squared Euclidean distances, clamped at 0 against round-off."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * a @ b.T
    return sq.clamp_min(0.0)


def median_squared_distance(sq: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal entries of a squared-distance matrix (detached; > 0)."""
    sq = sq.detach()
    if sq.shape[0] == sq.shape[1]:
        off_diagonal = ~torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)
        values = sq[off_diagonal]
    else:
        values = sq.flatten()
    if values.numel() == 0:
        return torch.ones((), device=sq.device, dtype=sq.dtype)
    return values.median().clamp_min(1e-12)


class Kernel:
    """Base class: `kernel(a, b) -> (n, m)` Gram matrix, differentiable in both inputs."""

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _DistanceKernel(Kernel):
    """A kernel of the squared distance, averaged over one or more bandwidths."""

    def __init__(self, bandwidths: Sequence[float] | None = None, median_scales: Sequence[float] = (1.0,)) -> None:
        if bandwidths is not None and (len(bandwidths) == 0 or min(bandwidths) <= 0):
            raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths}")
        if len(median_scales) == 0 or min(median_scales) <= 0:
            raise ValueError(f"median_scales must be positive, got {median_scales}")
        self.bandwidths = None if bandwidths is None else [float(b) for b in bandwidths]
        self.median_scales = [float(s) for s in median_scales]

    def scales(self, sq: torch.Tensor) -> list[torch.Tensor | float]:
        """The bandwidths for this Gram matrix (as sigma, in units of distance)."""
        if self.bandwidths is not None:
            return list(self.bandwidths)
        sigma = median_squared_distance(sq).sqrt()
        return [sigma * s for s in self.median_scales]

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = squared_distances(a, b)
        return torch.stack([self.of_squared_distance(sq, s) for s in self.scales(sq)]).mean(0)

    def of_squared_distance(self, sq: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        raise NotImplementedError


@KERNELS.register("gaussian")
class GaussianKernel(_DistanceKernel):
    """k(a, b) = exp(-||a - b||^2 / (2 sigma^2)); with the median heuristic sigma^2 = median / 2 * scale^2."""

    def scales(self, sq: torch.Tensor) -> list[torch.Tensor | float]:
        if self.bandwidths is not None:
            return list(self.bandwidths)
        sigma = (median_squared_distance(sq) / 2.0).sqrt()
        return [sigma * s for s in self.median_scales]

    def of_squared_distance(self, sq: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.exp(-sq / (2.0 * sigma * sigma))


@KERNELS.register("imq")
class IMQKernel(_DistanceKernel):
    """Inverse multiquadric, k(a, b) = c / sqrt(c^2 + ||a - b||^2): heavy tails keep gradients alive far away."""

    def of_squared_distance(self, sq: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return sigma / torch.sqrt(sigma * sigma + sq)


@KERNELS.register("laplacian")
class LaplacianKernel(_DistanceKernel):
    """k(a, b) = exp(-||a - b|| / sigma)."""

    def of_squared_distance(self, sq: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        # sqrt has an infinite slope at 0: keep exact zeros (the diagonal) out of its gradient.
        distance = torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))
        return torch.exp(-distance / sigma)


@KERNELS.register("cosine")
class CosineKernel(Kernel):
    """k(a, b) = cos(a, b): compares directions only; suits L2-normalised text embeddings."""

    def __init__(self, bandwidths: Sequence[float] | None = None, median_scales: Sequence[float] = (1.0,)) -> None:
        del bandwidths, median_scales  # no bandwidth; accepted so recipes can switch kernels freely

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@KERNELS.register("linear")
class LinearKernel(Kernel):
    """k(a, b) = a . b: its MMD is the squared distance between the two means."""

    def __init__(self, bandwidths: Sequence[float] | None = None, median_scales: Sequence[float] = (1.0,)) -> None:
        del bandwidths, median_scales

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T
