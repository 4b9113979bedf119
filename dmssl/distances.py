"""Distances between two sets of embeddings: the distribution-matching term of dmssl.

Every distance is called as `distance(x, y)` with `x: (n, d)` and `y: (m, d)`, n != m allowed, and
returns a 0-dim tensor with gradient to both inputs. The math is in module-level functions
(`cosine_distance`, `mmd2`, `sliced_wasserstein`, `sinkhorn`); the classes hold hyper-parameters.

    >>> distance = build_distance("mmd", kernel="gaussian", bandwidths=None)
    >>> distance(torch.randn(64, 128), torch.randn(448, 128))

References:
    - [0] Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.
    - [1] Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015.
    - [2] Cuturi, "Sinkhorn Distances", NeurIPS 2013; Feydy et al., "Interpolating between Optimal
          Transport and MMD using Sinkhorn Divergences", AISTATS 2019 (debiasing).

CORAL (dmssl/coral.py), domain-adversarial alignment (dmssl/adversarial.py) and its class-conditional form
(dmssl/cdan.py) register here too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.errors import ConfigError
from dmssl.kernels import KERNELS, Kernel, squared_distances
from dmssl.registry import Registry

DISTANCES: Registry[type[Distance]] = Registry("distance")


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_rows: int = 1) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"distances take (n, d) and (m, d) tensors, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} rows on each side, got {x.shape[0]} and {y.shape[0]}")


# ---------------------------------------------------------------- the math


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cos(mean(x), mean(y)): matches first moments' directions only. O((n + m) d)."""
    _check_pair(x, y)
    return 1.0 - F.cosine_similarity(x.mean(0), y.mean(0), dim=0, eps=1e-8)


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: Kernel, unbiased: bool = True) -> torch.Tensor:
    """Squared maximum mean discrepancy. O((n + m)^2 d).

    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y). The unbiased U-statistic leaves out the i = i'
    terms (needs n, m >= 2 and may be slightly negative); the biased V-statistic keeps them (>= 0).
    The kernel sees the joint set once, so a median-heuristic bandwidth is shared by all three terms.
    """
    _check_pair(x, y, min_rows=2 if unbiased else 1)
    n, m = x.shape[0], y.shape[0]
    gram = kernel(torch.cat([x, y]), torch.cat([x, y]))
    kxx, kyy, kxy = gram[:n, :n], gram[n:, n:], gram[:n, n:]
    if unbiased:
        term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        term_x, term_y = kxx.mean(), kyy.mean()
    return term_x + term_y - 2.0 * kxy.mean()


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Exact W_p^p between the empirical measures of each column pair: (n, L), (m, L) -> (L,).

    W_p^p = integral over t in (0, 1) of |F_u^-1(t) - F_v^-1(t)|^p. Both quantile functions are steps,
    constant between the merged levels {i/n} and {j/m}, so the integral is an exact finite sum; this
    is what makes n != m work without interpolation.
    """
    n, m = u.shape[0], v.shape[0]
    u_sorted, v_sorted = u.sort(0).values, v.sort(0).values
    levels = torch.cat([torch.arange(1, n + 1, device=u.device) / n, torch.arange(1, m + 1, device=u.device) / m])
    levels = levels.to(torch.float64).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    keep = widths > 1e-12
    levels, widths = levels[keep], widths[keep]
    midpoints = levels - widths / 2
    iu = torch.clamp((midpoints * n).ceil().long() - 1, 0, n - 1)
    iv = torch.clamp((midpoints * m).ceil().long() - 1, 0, m - 1)
    gaps = (u_sorted[iu] - v_sorted[iv]).abs().pow(p)  # (k, L)
    return (gaps * widths.to(gaps.dtype).unsqueeze(1)).sum(0)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 128, p: int = 2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced W_p^p: the mean over random unit directions of the 1-D W_p^p of the projections.

    O(L (n + m) (d + log(n + m))) for L projections. Directions come from `generator` (seeded by the
    caller, so every process in a distributed run draws the same ones).
    """
    _check_pair(x, y)
    directions = torch.randn(x.shape[1], num_projections, generator=generator, device="cpu")
    directions = F.normalize(directions, dim=0).to(device=x.device, dtype=x.dtype)
    return wasserstein_1d(x @ directions, y @ directions, p=p).mean()


def _entropic_ot(x: torch.Tensor, y: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic OT value for uniform weights and cost ||x - y||^2, by log-domain Sinkhorn.

    The iterations run without autograd; the gradient is attached by the envelope theorem
    (d OT_eps / d C = the optimal plan P), which is exact at convergence and costs one (n, m) product
    instead of back-propagating through every iteration.
    """
    n, m = x.shape[0], y.shape[0]
    cost = squared_distances(x, y)
    log_a = torch.full((n,), -math.log(n), device=x.device, dtype=cost.dtype)
    log_b = torch.full((m,), -math.log(m), device=x.device, dtype=cost.dtype)
    with torch.no_grad():
        c = cost.detach()
        f = torch.zeros(n, device=x.device, dtype=cost.dtype)
        g = torch.zeros(m, device=x.device, dtype=cost.dtype)
        for _ in range(iterations):
            f = -epsilon * torch.logsumexp(log_b.unsqueeze(0) + (g.unsqueeze(0) - c) / epsilon, dim=1)
            g = -epsilon * torch.logsumexp(log_a.unsqueeze(1) + (f.unsqueeze(1) - c) / epsilon, dim=0)
        log_plan = log_a.unsqueeze(1) + log_b.unsqueeze(0) + (f.unsqueeze(1) + g.unsqueeze(0) - c) / epsilon
        plan = log_plan.exp()
        value = (f * log_a.exp()).sum() + (g * log_b.exp()).sum()
    transport = (plan * cost).sum()
    return value + transport - transport.detach()


def sinkhorn(x: torch.Tensor, y: torch.Tensor, epsilon: float = 0.05, iterations: int = 100,
             debias: bool = True) -> torch.Tensor:
    """Entropic Wasserstein-2 (squared cost); debiased it is the Sinkhorn divergence, 0 when x = y.

    S_eps(x, y) = OT_eps(x, y) - OT_eps(x, x) / 2 - OT_eps(y, y) / 2. O(iterations n m) time and
    O(n m) memory; as epsilon -> 0, OT_eps tends to the exact W_2^2.
    """
    _check_pair(x, y)
    value = _entropic_ot(x, y, epsilon, iterations)
    if debias:
        value = value - 0.5 * _entropic_ot(x, x, epsilon, iterations) - 0.5 * _entropic_ot(y, y, epsilon, iterations)
    return value


# ---------------------------------------------------------------- modules


@dataclass
class NoOptions:
    """A distance without options."""


class Distance(nn.Module):
    """Base class: `forward(x, y, generator=None) -> 0-dim tensor`; only random distances use the generator.

    `Options` is the dataclass of its `distance.*` keys; its fields are the constructor's keyword arguments.
    A distance that `learns` (the adversary's domain classifier) builds its parameters in
    `prepare(width, num_classes)`, which the run calls with the matched embeddings' width and the number of
    classes before it makes the optimiser. One that `conditions_on_predictions` (CDAN) also takes each row's
    class probabilities: `forward(x, y, generator, x_probabilities=..., y_probabilities=...)`.
    """

    Options: ClassVar[type] = NoOptions
    learns: ClassVar[bool] = False
    conditions_on_predictions: ClassVar[bool] = False

    def prepare(self, width: int, num_classes: int = 0) -> None:
        """Build parameters for (n, width) inputs; nothing for a distance that does not learn."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@DISTANCES.register("cosine")
class CosineDistance(Distance):
    """1 - cosine similarity of the two means (see `cosine_distance`)."""

    Options = NoOptions

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return cosine_distance(x, y)


@dataclass
class MMDOptions:
    kernel: str = "gaussian"  # a registered kernel: gaussian, imq, laplacian, cosine, linear
    bandwidths: list[float] | None = None  # kernel bandwidths (sigma); null = the median heuristic
    median_scales: list[float] = field(default_factory=lambda: [1.0])  # multiples of the median bandwidth, averaged
    estimator: Literal["unbiased", "biased"] = "unbiased"  # U-statistic or V-statistic

    def validate(self) -> None:
        try:
            KERNELS.get(self.kernel)
        except ConfigError as err:  # the registry's message lists the kernels
            raise ConfigError(f"distance.kernel={self.kernel!r}: {err}") from None
        if self.bandwidths is not None and (not self.bandwidths or any(b <= 0 for b in self.bandwidths)):
            raise ConfigError(f"distance.bandwidths={self.bandwidths} must be null (the median heuristic) or a "
                              "non-empty list of values > 0")
        if not self.median_scales or any(s <= 0 for s in self.median_scales):
            raise ConfigError(f"distance.median_scales={self.median_scales} must be > 0")


@DISTANCES.register("mmd")
class MMD(Distance):
    """Squared MMD with a named kernel (see `mmd2` and `dmssl.kernels`).

    Args:
        kernel: gaussian, imq, laplacian, cosine or linear.
        bandwidths: kernel bandwidths (sigma); None uses the median heuristic.
        median_scales: multiples of the median-heuristic bandwidth, averaged (e.g. [0.5, 1, 2]).
        estimator: "unbiased" (U-statistic) or "biased" (V-statistic).
    """

    Options = MMDOptions

    def __init__(self, kernel: str = "gaussian", bandwidths: Sequence[float] | None = None,
                 median_scales: Sequence[float] = (1.0,), estimator: str = "unbiased") -> None:
        super().__init__()
        if estimator not in ("unbiased", "biased"):
            raise ValueError(f"estimator={estimator!r}; allowed: 'unbiased', 'biased'")
        self.kernel = KERNELS.get(kernel)(bandwidths=bandwidths, median_scales=median_scales)
        self.unbiased = estimator == "unbiased"

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return mmd2(x, y, self.kernel, unbiased=self.unbiased)


@dataclass
class WassersteinOptions:
    method: Literal["sliced", "sinkhorn"] = "sliced"  # sliced (fast) or sinkhorn (entropic, debiased)
    num_projections: int = 128  # sliced: random directions per step
    p: int = 2  # sliced: order of the 1-D Wasserstein distance
    epsilon: float = 0.05  # sinkhorn: entropic regularisation
    iterations: int = 100  # sinkhorn: iterations

    def validate(self) -> None:
        for key in ("num_projections", "p", "iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distance.{key}={getattr(self, key)} must be >= 1")
        if self.epsilon <= 0:
            raise ConfigError(f"distance.epsilon={self.epsilon} must be > 0")


@DISTANCES.register("wasserstein")
class Wasserstein(Distance):
    """Wasserstein-2 (squared): `method="sliced"` (default, fast) or `"sinkhorn"` (entropic, debiased).

    Args:
        method: "sliced" or "sinkhorn".
        num_projections: sliced: random directions per call.
        p: sliced: the order of the 1-D Wasserstein distance (2 gives W_2^2).
        seed: sliced: directions when no generator is passed (the trainer passes one per step).
        epsilon, iterations, debias: sinkhorn: entropic regularisation, iterations, debiasing.
    """

    Options = WassersteinOptions

    def __init__(self, method: str = "sliced", num_projections: int = 128, p: int = 2, seed: int = 0,
                 epsilon: float = 0.05, iterations: int = 100, debias: bool = True) -> None:
        super().__init__()
        if method not in ("sliced", "sinkhorn"):
            raise ValueError(f"method={method!r}; allowed: 'sliced', 'sinkhorn'")
        if num_projections < 1 or iterations < 1 or epsilon <= 0 or p < 1:
            raise ValueError("num_projections, iterations and p must be >= 1 and epsilon > 0")
        self.method, self.num_projections, self.p, self.seed = method, num_projections, p, seed
        self.epsilon, self.iterations, self.debias = epsilon, iterations, debias

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.method == "sinkhorn":
            return sinkhorn(x, y, self.epsilon, self.iterations, self.debias)
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        return sliced_wasserstein(x, y, self.num_projections, self.p, generator)


def build_distance(name: str, options: Any = None, **overrides: Any) -> Distance:
    """`build_distance("mmd", kernel="imq")` or `build_distance("mmd", MMD.Options(...))` -> `(x, y) -> 0-dim tensor`.

    Names: the registered distances (cosine, mmd, wasserstein, and any registered later). Unknown names
    or options raise ConfigError listing what exists.
    """
    values = dataclasses.asdict(options) if options is not None else {}
    return DISTANCES.build(name, **(values | overrides))


# Registered in their own files (one method each); imported here so that every distance name resolves.
from dmssl import adversarial, cdan, coral  # noqa: E402,F401
