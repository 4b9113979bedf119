"""Distances against independent computations: closed forms, scipy, brute-force kernel sums, assignment."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import wasserstein_distance

from dmssl.distances import build_distance, mmd2, sinkhorn, sliced_wasserstein, wasserstein_1d
from dmssl.errors import ConfigError
from dmssl.kernels import GaussianKernel, IMQKernel, LaplacianKernel


@pytest.fixture(autouse=True)
def _float64():
    # Reference values are computed in float64; restore the default for other test modules.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def brute_force_mmd2(x, y, k, unbiased):
    """Direct double sums over a scalar kernel function k(a, b)."""
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not unbiased or i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not unbiased or i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    if unbiased:
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize(("name", "scalar"), [
    ("gaussian", lambda a, b, s: math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))),
    ("imq", lambda a, b, s: s / math.sqrt(s * s + float(((a - b) ** 2).sum()))),
    ("laplacian", lambda a, b, s: math.exp(-math.sqrt(float(((a - b) ** 2).sum())) / s)),
])
def test_mmd__matches_brute_force_kernel_sums(estimator, name, scalar):
    x, y = torch.randn(7, 3), torch.randn(5, 3) + 0.5
    bandwidths = [0.7, 2.0]
    distance = build_distance("mmd", kernel=name, bandwidths=bandwidths, estimator=estimator)

    def k(a, b):
        return sum(scalar(a, b, s) for s in bandwidths) / len(bandwidths)

    expected = brute_force_mmd2(x, y, k, estimator == "unbiased")
    assert float(distance(x, y)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mmd__median_heuristic_uses_joint_median():
    x, y = torch.randn(6, 4), torch.randn(9, 4) * 2
    z = torch.cat([x, y])
    sq = torch.cdist(z, z) ** 2
    median = sq[~torch.eye(len(z), dtype=torch.bool)].median()
    explicit = build_distance("mmd", kernel="gaussian", bandwidths=[float((median / 2).sqrt())])
    assert float(build_distance("mmd", bandwidths=None)(x, y)) == pytest.approx(float(explicit(x, y)), rel=1e-9)


def test_mmd__linear_kernel_biased_is_squared_mean_difference():
    x, y = torch.randn(8, 5), torch.randn(3, 5)
    value = build_distance("mmd", kernel="linear", estimator="biased")(x, y)
    assert float(value) == pytest.approx(float(((x.mean(0) - y.mean(0)) ** 2).sum()), rel=1e-9)


def test_mmd__zero_for_identical_sets_biased_and_positive_for_shifted():
    x = torch.randn(10, 3)
    assert float(build_distance("mmd", estimator="biased")(x, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(build_distance("mmd")(x, x + 3.0)) > 0.1


def test_cosine__closed_form():
    x, y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0]])
    assert float(build_distance("cosine")(x, y)) == pytest.approx(1.0)
    assert float(build_distance("cosine")(x, 2 * x)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("n", "m"), [(5, 5), (7, 4), (1, 6), (13, 8)])
def test_wasserstein_1d__p1_matches_scipy(n, m):
    u, v = torch.randn(n, 1), torch.randn(m, 1) * 2 + 1
    expected = wasserstein_distance(u[:, 0].numpy(), v[:, 0].numpy())
    assert float(wasserstein_1d(u, v, p=1)[0]) == pytest.approx(expected, rel=1e-9)


def test_wasserstein_1d__p2_closed_form_for_equal_sizes():
    u, v = torch.randn(9, 1), torch.randn(9, 1)
    expected = ((u[:, 0].sort().values - v[:, 0].sort().values) ** 2).mean()
    assert float(wasserstein_1d(u, v, p=2)[0]) == pytest.approx(float(expected), rel=1e-12)


def test_sliced_wasserstein__shift_closed_form_and_seeded():
    # Shifting every point by t gives W2^2 = (theta . t)^2 per direction: mean over directions.
    x = torch.randn(20, 3)
    t = torch.tensor([1.0, -2.0, 0.5])
    directions = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(3)), dim=0)
    expected = ((t @ directions) ** 2).mean()
    value = sliced_wasserstein(x, x + t, num_projections=64, generator=torch.Generator().manual_seed(3))
    assert float(value) == pytest.approx(float(expected), rel=1e-9)
    distance = build_distance("wasserstein", method="sliced", num_projections=16, seed=5)
    assert float(distance(x, x + t)) == float(distance(x, x + t))


def test_sinkhorn__small_epsilon_approaches_exact_assignment():
    x, y = torch.rand(6, 2), torch.rand(6, 2)
    cost = (torch.cdist(x, y) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    exact = cost[rows, cols].mean()
    value = sinkhorn(x, y, epsilon=1e-3, iterations=3000, debias=False)
    assert float(value) == pytest.approx(exact, abs=5e-3)


def test_sinkhorn__debiased_is_zero_on_identical_sets():
    x = torch.randn(8, 3)
    assert float(build_distance("wasserstein", method="sinkhorn", epsilon=0.1)(x, x)) == pytest.approx(0.0, abs=1e-8)


DISTANCES = [("cosine", {}), ("mmd", {"kernel": "gaussian"}), ("mmd", {"kernel": "imq", "estimator": "biased"}),
             ("mmd", {"kernel": "laplacian"}), ("mmd", {"kernel": "cosine"}),
             ("wasserstein", {"method": "sliced", "num_projections": 32}),
             ("wasserstein", {"method": "sinkhorn", "epsilon": 0.1, "iterations": 50}), ("coral", {}),
             ("coral", {"match_means": True})]


@pytest.mark.parametrize(("name", "options"), DISTANCES)
def test_distance__gradients_to_both_sides_and_unequal_sizes(name, options):
    x = torch.randn(6, 4, requires_grad=True)
    y = (torch.randn(11, 4) + 1.0).requires_grad_()
    value = build_distance(name, **options)(x, y)
    assert value.dim() == 0
    value.backward()
    assert x.grad is not None and y.grad is not None
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize(("name", "options"), DISTANCES)
def test_distance__gradient_descent_brings_sets_together(name, options):
    target = torch.randn(16, 3) + 2.0
    x = torch.randn(12, 3, requires_grad=True)
    distance = build_distance(name, **options)
    before = float(distance(x, target).detach())
    optimizer = torch.optim.SGD([x], lr=0.2)
    for _ in range(30):
        optimizer.zero_grad()
        distance(x, target).backward()
        optimizer.step()
    assert float(distance(x, target).detach()) < before


def test_sinkhorn__envelope_gradient_matches_finite_differences():
    x, y = torch.randn(4, 2), torch.randn(5, 2)
    x.requires_grad_()
    value = sinkhorn(x, y, epsilon=0.5, iterations=500, debias=False)
    value.backward()
    eps = 1e-5
    bumped = x.detach().clone()
    bumped[1, 0] += eps
    lower = x.detach().clone()
    lower[1, 0] -= eps
    numeric = (sinkhorn(bumped, y, 0.5, 500, False) - sinkhorn(lower, y, 0.5, 500, False)) / (2 * eps)
    assert float(x.grad[1, 0]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-6)


def test_build_distance__unknown_name_and_option_name_the_bad_value():
    with pytest.raises(ConfigError, match="'wasserstien'.*did you mean 'wasserstein'"):
        build_distance("wasserstien")
    with pytest.raises(ConfigError, match="'kernal'.*did you mean 'kernel'"):
        build_distance("mmd", kernal="imq")


def test_distance__bad_shapes_raise():
    with pytest.raises(ValueError, match="feature widths differ"):
        build_distance("cosine")(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2(torch.randn(1, 2), torch.randn(3, 2), GaussianKernel(), unbiased=True)


def test_kernels__unit_diagonal():
    x = torch.randn(5, 3)
    for kernel in (GaussianKernel(), IMQKernel(), LaplacianKernel([1.0, 2.0])):
        assert np.allclose(kernel(x, x).diagonal().numpy(), 1.0)
