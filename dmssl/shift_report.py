"""How far apart the labeled and the unlabeled data start: the shift report printed at the start of a run.

The labeled and unlabeled samples' features from the starting encoder (before any training step) are
compared by the squared MMD with a Gaussian kernel at the median-heuristic bandwidth, and the value is set
against a permutation noise floor: the same statistic with the labeled/unlabeled assignment shuffled, which
is what the distance reads when both sides come from one distribution. One Gram matrix of the joint set
serves every shuffle (the bandwidth depends only on the joint set), so 200 shuffles cost little more
than one distance.

    shift = MMD^2(labeled, unlabeled),   floor = mean_pi MMD^2(pi), p = (1 + #{pi: MMD^2(pi) >= shift}) / (1 + P)

The verdict reads "a shift to close" when p < `SIGNIFICANCE`, otherwise "nothing to close"; z is the
shift's distance above the floor in the shuffles' standard deviations (how far beyond noise it lies). What it has predicted so far is in docs/distances.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device

from dmssl.data import seeded_subset
from dmssl.kernels import median_squared_distance, squared_distances

SIGNIFICANCE = 0.01


@dataclass
class ShiftReport:
    mmd2: float  # between the labeled and the unlabeled features
    noise_floor: float  # mean over the shuffles
    noise_std: float
    p_value: float
    permutations: int
    num_labeled: int
    num_unlabeled: int

    @property
    def z(self) -> float:
        """Standard deviations of the shuffled statistic by which the shift exceeds the floor."""
        return (self.mmd2 - self.noise_floor) / self.noise_std if self.noise_std > 0 else 0.0

    @property
    def verdict(self) -> str:
        return "a shift to close" if self.p_value < SIGNIFICANCE else "nothing to close"

    def describe(self) -> str:
        return (f"shift: MMD^2 {self.mmd2:.4g} between {self.num_labeled} labeled and {self.num_unlabeled} unlabeled "
                f"samples (starting encoder's features); noise floor {self.noise_floor:.4g} +- {self.noise_std:.2g} "
                f"({self.permutations} shuffles): z={self.z:.1f}, p={self.p_value:.3g}: {self.verdict}")

    def record(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()} | {
            "z": round(self.z, 3), "verdict": self.verdict}


def mmd2_from_gram(gram: torch.Tensor, is_x: torch.Tensor) -> torch.Tensor:
    """Unbiased squared MMD of the rows marked `is_x` against the others, read off a joint Gram matrix."""
    x, y = is_x.to(gram.dtype), (~is_x).to(gram.dtype)
    n, m = x.sum(), y.sum()
    diagonal = gram.diagonal()
    kxx = (x @ gram @ x - (diagonal * x).sum()) / (n * (n - 1))
    kyy = (y @ gram @ y - (diagonal * y).sum()) / (m * (m - 1))
    return kxx + kyy - 2.0 * (x @ gram @ y) / (n * m)


def shift_statistics(labeled: torch.Tensor, unlabeled: torch.Tensor, permutations: int = 200,
                     seed: int = 0) -> ShiftReport:
    """The report for two feature sets (n, d) and (m, d), n, m >= 2."""
    joint = torch.cat([labeled, unlabeled]).double()
    sq = squared_distances(joint, joint)
    gram = torch.exp(-sq / median_squared_distance(sq))  # sigma^2 = median / 2, the kernels' heuristic
    is_x = torch.arange(joint.shape[0]) < labeled.shape[0]
    observed = float(mmd2_from_gram(gram, is_x))
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([mmd2_from_gram(gram, is_x[torch.randperm(len(is_x), generator=generator)])
                            for _ in range(permutations)])
    return ShiftReport(mmd2=observed, noise_floor=float(shuffled.mean()), noise_std=float(shuffled.std()),
                       p_value=float((1 + (shuffled >= observed).sum()) / (1 + permutations)),
                       permutations=permutations, num_labeled=labeled.shape[0], num_unlabeled=unlabeled.shape[0])


@torch.no_grad()
def features_of(model: Any, inputs: Any, samples: list, device: torch.device, batch_size: int) -> torch.Tensor:
    """The encoder's features of each sample's test view (the clean one)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(samples), batch_size):
        batch = send_to_device(inputs.collate([inputs.test_view(s) for s in samples[start: start + batch_size]]), device)
        parts.append(model(batch, with_features=True)[-1].float().cpu())
    model.train(was_training)
    return torch.cat(parts)


def shift_report(model: Any, inputs: Any, labeled: list, unlabeled: list, seed: int, device: torch.device,
                 batch_size: int, size: int = 256, permutations: int = 200) -> ShiftReport | None:
    """The report of a seeded sample of `size` labeled and `size` unlabeled samples (the samples, as the
    adapter or cache takes them); None with fewer than two on a side. Runs in a forked RNG, so a run with the
    report draws exactly what one without it draws."""
    keep_l = seeded_subset(len(labeled), size, seed + 19)
    keep_u = seeded_subset(len(unlabeled), size, seed + 23)
    if len(keep_l) < 2 or len(keep_u) < 2:
        return None
    with torch.random.fork_rng(devices=[]):
        x = features_of(model, inputs, [labeled[i] for i in keep_l], device, batch_size)
        y = features_of(model, inputs, [unlabeled[i] for i in keep_u], device, batch_size)
        return shift_statistics(x, y, permutations, seed)
