"""Data plumbing shared by every modality: the labeled split, and training steps built ahead of time.

A training step is one DataLoader item: `StepDataset[s]` draws step s's labeled and unlabeled
samples from two seeded streams, applies the views with an RNG seeded by (seed, step, rank), and
collates everything into one batch. Nothing depends on what ran before, so workers build steps in
parallel, and a resumed run rebuilds exactly the steps it would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dmssl.errors import DataError
from dmssl.modality import Modality, RawData


def split_labeled(labels: Sequence[int], num_classes: int, num_labels: int | None = None,
                  labels_per_class: int | None = None, seed: int = 0) -> list[int]:
    """Indices of a balanced, seeded labeled subset of the samples whose label is known (>= 0).

    With neither count given, every known label is used (a fully supervised split).
    """
    known = [i for i, y in enumerate(labels) if y >= 0]
    if num_labels is None and labels_per_class is None:
        return known
    if labels_per_class is None:
        assert num_labels is not None
        if num_labels % num_classes:
            raise DataError(
                f"data.num_labels={num_labels} is not divisible by the {num_classes} classes; a balanced split "
                f"needs a multiple of {num_classes} (or set data.labels_per_class)"
            )
        labels_per_class = num_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for k in range(num_classes):
        members = [i for i in known if labels[i] == k]
        if len(members) < labels_per_class:
            raise DataError(
                f"class {k} has {len(members)} labeled samples, fewer than the {labels_per_class} per class asked"
                f" for (data.num_labels / data.labels_per_class); at most {len(members)} fit"
            )
        order = torch.randperm(len(members), generator=generator)[:labels_per_class]
        chosen.extend(members[int(j)] for j in order)
    return sorted(chosen)


def split_dev(labels: Sequence[int], labeled: Sequence[int], size: int, seed: int) -> list[int]:
    """A seeded dev set of `size` training samples with known labels, outside the labeled split.

    The trainer removes them from the unlabeled pool too: a dev sample is never trained on, so that
    hyper-parameters chosen on dev accuracy say nothing about the test set.
    """
    if size <= 0:
        return []
    taken = set(labeled)
    candidates = [i for i, y in enumerate(labels) if y >= 0 and i not in taken]
    if size > len(candidates):
        raise DataError(f"data.dev_size={size} is more than the {len(candidates)} labeled training samples outside "
                        "the labeled split; lower it")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:size]
    return sorted(candidates[int(j)] for j in order)


def in_groups(groups: Sequence[str] | None, wanted: Sequence[str] | None, key: str, n: int) -> list[bool]:
    """Which of n samples belong to one of the `wanted` groups (all of them when `wanted` is None).

    `key` names the setting in errors: a wanted group the data does not have is a typo, not an empty split.
    """
    if wanted is None:
        return [True] * n
    if groups is None:
        raise DataError(f"{key}={list(wanted)} needs a group per sample, and this data has none; the audio and image-folder "
                        "adapters derive groups with modality.group_pattern, the text adapter with modality.group_column "
                        "(docs/distances.md)")
    known = sorted(set(groups))
    unknown = [g for g in wanted if g not in known]
    if unknown:
        raise DataError(f"{key} names unknown groups {unknown}; allowed: {', '.join(known)}")
    chosen = set(wanted)
    return [g in chosen for g in groups]


def long_tailed(labels: Sequence[int], num_classes: int, ratio: float, seed: int) -> list[int]:
    """Positions of a seeded subset of `labels` whose class counts fall exponentially with the class index.

    n_k = floor(n_min * ratio ** (-k / (K - 1))), n_min the smallest class's count here: class 0 keeps n_min
    samples, class K-1 n_min / ratio (at least one), the usual long-tailed profile of semi-supervised
    benchmarks (DARP, CReST). Samples of unknown label (-1) cannot be placed and are an error.
    """
    if any(y < 0 for y in labels):
        raise DataError("data.pool_imbalance_ratio needs the class of every unlabeled-pool sample; this data has "
                        "unlabeled samples of unknown class")
    members = [[i for i, y in enumerate(labels) if y == k] for k in range(num_classes)]
    present = [m for m in members if m]
    n_min = min(len(m) for m in present)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for k, m in enumerate(members):
        keep = max(1, math.floor(n_min * ratio ** (-k / max(num_classes - 1, 1)))) if m else 0
        chosen += [m[int(j)] for j in torch.randperm(len(m), generator=generator)[:keep]]
    return sorted(chosen)


def seeded_subset(n: int, size: int | None, seed: int) -> list[int]:
    """A fixed random subset of range(n) of `size` (all of it when size is None or >= n), in order."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(int(i) for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size])


class SampleStream:
    """An endless stream over n items: item p is perm_e[p % n], with perm_e a seeded permutation of epoch e = p // n."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise DataError("a sample stream needs at least one sample")
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=generator))
        return self._cache[1]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self.permutation(p // self.n)[p % self.n]) for p in range(start, start + count)]


class StepDataset(Dataset):
    """Item s = training step s of this process: {"inputs", "labels", "unlabeled_targets", "num_unlabeled"}.

    `inputs` is the adapter's collate of [labeled weak views] + [unlabeled view 1] + [view 2] ...,
    in the order of `unlabeled_views` (e.g. ("weak", "strong", "strong")), so one forward pass covers
    the whole step. Process r of W takes the r-th slice of each global step.
    """

    def __init__(self, modality: Modality, labeled: Sequence[Any], labels: Sequence[int],
                 unlabeled: Sequence[Any], unlabeled_targets: Sequence[int], batch_size: int, mu: int,
                 unlabeled_views: Sequence[str], num_steps: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if unlabeled_views and len(unlabeled) == 0:
            raise DataError("this objective needs unlabeled data, but the unlabeled pool is empty")
        self.modality = modality
        self.labeled, self.labels = labeled, list(labels)
        self.unlabeled, self.unlabeled_targets = unlabeled, list(unlabeled_targets)
        self.batch_size, self.unlabeled_batch = batch_size, batch_size * mu if unlabeled_views else 0
        self.unlabeled_views = tuple(unlabeled_views)
        self.num_steps, self.seed, self.rank, self.world_size = num_steps, seed, rank, world_size
        self.labeled_stream = SampleStream(len(labeled), seed * 2 + 1)
        self.unlabeled_stream = SampleStream(len(unlabeled), seed * 2 + 2) if unlabeled_views else None

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> dict[str, Any]:
        slot = step * self.world_size + self.rank
        labeled_idx = self.labeled_stream.take(slot * self.batch_size, self.batch_size)
        unlabeled_idx = (self.unlabeled_stream.take(slot * self.unlabeled_batch, self.unlabeled_batch)
                         if self.unlabeled_stream else [])
        with seeded_rng(self.seed * 1_000_003 + slot):
            views = self.modality.weak_views([self.labeled[i] for i in labeled_idx])
            unlabeled = [self.unlabeled[i] for i in unlabeled_idx]
            for view in self.unlabeled_views:
                make = self.modality.weak_views if view == "weak" else self.modality.strong_views
                views.extend(make(unlabeled))
        return {
            "inputs": self.modality.collate(views),
            "labels": torch.tensor([self.labels[i] for i in labeled_idx], dtype=torch.long),
            "unlabeled_targets": torch.tensor([self.unlabeled_targets[i] for i in unlabeled_idx], dtype=torch.long),
            "num_unlabeled": len(unlabeled_idx),
        }


class seeded_rng:
    """Context manager: seed torch's and Python's global RNGs, and restore them afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.torch_state = torch.get_rng_state()
        self.python_state = random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)


class EvalDataset(Dataset):
    """(test_view(sample), label) pairs."""

    def __init__(self, modality: Modality, samples: Sequence[Any], labels: Sequence[int]) -> None:
        self.modality, self.samples, self.labels = modality, samples, list(labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.modality.test_view(self.samples[i]), self.labels[i]


class EvalCollate:
    """Collate (view, label) pairs with the adapter's collate; a class so that workers can pickle it."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def __call__(self, items: list[tuple[Any, int]]) -> dict[str, Any]:
        return {"inputs": self.modality.collate([v for v, _ in items]),
                "labels": torch.tensor([y for _, y in items], dtype=torch.long)}


def check_raw_data(raw: RawData, needs_test: bool = True) -> None:
    """Clear errors for data that cannot train a classifier (`needs_test=False`: a transductive run tests on its
    unlabeled pool, so the data may hold no test set)."""
    k = raw.num_classes
    if k < 2:
        raise DataError(f"need at least 2 classes, found {k}: {raw.class_names}")
    if len(raw.train) != len(raw.train_labels) or len(raw.test) != len(raw.test_labels):
        raise DataError("the adapter returned samples and labels of different lengths")
    if (raw.train_groups is not None and len(raw.train_groups) != len(raw.train)) or \
            (raw.test_groups is not None and len(raw.test_groups) != len(raw.test)):
        raise DataError("the adapter returned samples and groups of different lengths")
    if len(raw.train) == 0:
        raise DataError("the training set is empty")
    if len(raw.test) == 0 and needs_test:
        raise DataError("the test set is empty")
    bad = sorted({y for y in list(raw.train_labels) + list(raw.test_labels) if y >= k or y < -1})
    if bad:
        raise DataError(f"labels {bad[:5]} are outside [0, {k}) (or -1 for unlabeled)")
    present = {y for y in raw.train_labels if y >= 0}
    missing = [raw.class_names[c] for c in range(k) if c not in present]
    if missing:
        raise DataError(f"classes with no labeled training sample: {missing}")
