"""Conformance kit for modality adapters: `check_adapter(MyModality, cfg)` in your own tests.

Every check runs on the adapter's real data and reports what is wrong and what to do about it; all
violations are collected and raised together as one `AdapterCheckError`, so one run shows them all.

    def test_my_adapter():
        cfg = resolve(["recipe=my_recipe.yaml"])
        report = check_adapter(MyModality, cfg)   # raises AdapterCheckError listing every violation
        assert report.passed

Checks: load() returns consistent RawData; views are deterministic under a fixed seed, keep the
sample's label (a view stays more similar to its own sample than to one of another class, judged by
the adapter's encoder) and differ between seeds; collate keeps every sample, including samples of
different lengths; the encoder's output is (B, feature_dim), finite and differentiable; two
optimisation steps on one labeled batch lower the loss; a fresh adapter rebuilt from
`inference_state()` (as `dmssl.load` does, without the data) gives the same features; the adapter pickles
(DataLoader workers).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dmssl.config import Config
from dmssl.data import seeded_rng
from dmssl.modality import Modality, RawData
from dmssl.model import SSLModel
from dmssl.objective import StepEmbeddings, build_objective


class AdapterCheckError(AssertionError):
    """One or more conformance checks failed; the message lists each with what to fix."""


@dataclass
class AdapterReport:
    """The outcome of `check_adapter`: passed checks and violations (each says what to fix)."""

    passed_checks: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


def same(a: Any, b: Any) -> bool:
    """Structural equality for views: tensors, arrays, lists, tuples, dicts, dataclasses, scalars."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and hasattr(b, "__dict__") and type(a) is type(b):
        return same(vars(a), vars(b))
    return bool(a == b)


def batch_size_of(batch: Any) -> set[int]:
    if isinstance(batch, torch.Tensor):
        return {batch.shape[0]}
    if isinstance(batch, dict):
        return {size for value in batch.values() for size in batch_size_of(value)}
    return {-1}


# A view that swaps in another sample scores about 50% or less; real views of the shipped adapters
# score 70-100% under a random encoder (8x8 digits are the hardest case), on 64 pairs.
LABEL_CHECK_PAIRS = 64
LABEL_CHECK_THRESHOLD = 0.6


def check_adapter(adapter: Modality | type[Modality], cfg: Config | None = None, num_samples: int = 16,
                  seed: int = 0) -> AdapterReport:
    """Run every conformance check on `adapter` (an instance, or a class built from `cfg`).

    Args:
        adapter: the adapter, or its class.
        cfg: a Config whose `modality.options`, `data` and `model` build the adapter (needed for a class).
        num_samples: how many training samples the checks use.
        seed: the seed of every random choice the checks make.

    Raises:
        AdapterCheckError: listing every violation with what to fix.
    """
    if isinstance(adapter, type):
        if cfg is None:
            raise ValueError("check_adapter needs a cfg to build an adapter class")
        options = cfg.modality.options if cfg.modality.options is not None else (
            adapter.Options() if adapter.Options else None)
        adapter = adapter(options, cfg.data, cfg.model)
    report = AdapterReport()

    def check(name: str, ok: bool, fix: str) -> bool:
        (report.passed_checks if ok else report.violations).append(name if ok else f"{name}: {fix}")
        return ok

    # ---- load
    try:
        raw = adapter.load()
    except Exception as err:  # the kit reports, it does not crash
        check("load", False, f"load() raised {type(err).__name__}: {err}")
        raise AdapterCheckError(_format(report)) from err
    if not _check_raw(raw, check):
        raise AdapterCheckError(_format(report))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(raw.train), generator=generator)[:num_samples].tolist()
    samples = [raw.train[i] for i in picks]
    labels = [raw.train_labels[i] for i in picks]

    # ---- views: seeded, different across seeds
    for name in ("weak", "strong"):
        view = getattr(adapter, name)
        with seeded_rng(seed):
            first = [view(s) for s in samples]
        with seeded_rng(seed):
            second = [view(s) for s in samples]
        check(f"{name} view is deterministic under a fixed seed", all(same(a, b) for a, b in zip(first, second, strict=True)),
              f"{name}() gave different outputs under the same seed; draw randomness only from torch's global RNG or "
              "Python's `random` (the core seeds both), not from numpy or an own Generator")
    with seeded_rng(seed):
        one = [adapter.strong(s) for s in samples]
    with seeded_rng(seed + 1):
        other = [adapter.strong(s) for s in samples]
    check("strong view is random", not all(same(a, b) for a, b in zip(one, other, strict=True)),
          "strong() returned the same output under different seeds; it should augment randomly")
    # Training steps are built with the batched hooks (per-sample by default, vectorised where overridden).
    for name in ("weak_views", "strong_views"):
        many = getattr(adapter, name)
        with seeded_rng(seed):
            first = many(samples)
        with seeded_rng(seed):
            second = many(samples)
        if check(f"{name} gives one view per sample", isinstance(first, list) and len(first) == len(samples),
                 f"{name}() of {len(samples)} samples returned {type(first).__name__} of length "
                 f"{len(first) if hasattr(first, '__len__') else '?'}; return a list with one view per sample, in order"):
            check(f"{name} is deterministic under a fixed seed", all(same(a, b) for a, b in zip(first, second, strict=True)),
                  f"{name}() gave different outputs under the same seed; draw randomness only from torch's global RNG")

    # ---- collate keeps every sample (mixed lengths included)
    with seeded_rng(seed):
        views = [adapter.weak(s) for s in samples] + [adapter.strong(s) for s in samples] + \
                [adapter.test_view(s) for s in samples]
    try:
        batch = adapter.collate(views)
    except Exception as err:
        check("collate", False, f"collate() raised {type(err).__name__}: {err}; it must batch views of any length")
        raise AdapterCheckError(_format(report)) from err
    if not check("collate returns a tensor or a dict of tensors", _is_batch(batch),
                 f"collate() returned {type(batch).__name__}; return one tensor (batch first) or a dict of tensors, "
                 "which the core moves to the device and passes to the encoder as is"):
        raise AdapterCheckError(_format(report))
    check("collate keeps every sample", batch_size_of(batch) == {len(views)},
          f"collate() of {len(views)} views gave batch sizes {sorted(batch_size_of(batch))}; return a tensor or a dict of "
          "tensors whose first dimension is the number of views (pad, do not drop or merge samples)")

    # ---- encoder (seeded, so that the checks judged by its features give the same verdict every run)
    try:
        with seeded_rng(seed):
            encoder = adapter.build_encoder()
    except Exception as err:
        check("build_encoder", False, f"build_encoder() raised {type(err).__name__}: {err}")
        raise AdapterCheckError(_format(report)) from err
    width = getattr(encoder, "feature_dim", None)
    if not check("encoder declares feature_dim", isinstance(width, int) and width > 0,
                 f"the encoder must have an int attribute feature_dim > 0, got {width!r}"):
        raise AdapterCheckError(_format(report))
    encoder.train()
    try:
        features = encoder(batch)
    except Exception as err:
        check("encoder runs on a collated batch", False, f"encoder(collate(views)) raised {type(err).__name__}: {err}")
        raise AdapterCheckError(_format(report)) from err
    shape_ok = isinstance(features, torch.Tensor) and tuple(features.shape) == (len(views), width)
    check("encoder output is (B, feature_dim)", shape_ok,
          f"encoder(batch) returned shape {tuple(getattr(features, 'shape', ()))}, expected ({len(views)}, {width}); "
          "make feature_dim equal the width of what forward returns")
    if shape_ok:
        check("encoder output is finite", bool(torch.isfinite(features).all()), "encoder produced NaN or inf")
        grads = []
        if features.requires_grad:
            features.float().pow(2).mean().backward()
            grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        shape_ok &= check("gradients reach the encoder",
                          bool(grads) and any(g is not None and g.abs().sum() > 0 for g in grads),
                          "no gradient reached the encoder's parameters (its output "
                          f"{'has no grad_fn' if not features.requires_grad else 'does not depend on them'}); do not "
                          "detach, call .item()/.numpy(), or run forward under torch.no_grad()")

    # ---- collate keeps each sample in its row (else the labels and the views' checks below mean nothing)
    if shape_ok:
        shape_ok &= _check_collate_order(adapter, encoder, views, check)

    # ---- views keep the label (judged by the encoder's similarities)
    if shape_ok:
        _check_label_preserving(adapter, encoder, samples, labels, raw, check, seed)

    # ---- a tiny optimisation lowers the loss
    if shape_ok:
        _check_learns(adapter, raw, samples, labels, check, seed)

    # ---- a trained model can be reloaded without the data (dmssl.load, dmssl predict)
    if shape_ok:
        _check_reload(adapter, encoder, samples, check)

    try:
        pickle.dumps(adapter)
        check("adapter pickles (DataLoader workers)", True, "")
    except Exception as err:
        check("adapter pickles (DataLoader workers)", False,
              f"pickle.dumps(adapter) failed ({err}); keep lambdas, open files and locks out of the adapter's state")

    if report.violations:
        raise AdapterCheckError(_format(report))
    return report


def _is_batch(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return True
    return isinstance(batch, dict) and bool(batch) and all(isinstance(v, torch.Tensor) for v in batch.values())


def _check_collate_order(adapter: Modality, encoder: torch.nn.Module, views: list, check: Any) -> bool:
    """Each view's features in the batch equal its features collated alone (eval mode: no batch statistics).

    A collate that reorders rows pairs views with the wrong labels; without this check that shows up
    later as "views change the label", which sends the author to the wrong function.
    """
    picks = list(range(0, len(views), max(1, len(views) // 8)))[:8]
    with torch.no_grad():
        encoder.eval()
        together = encoder(adapter.collate(views)).float()
        alone = torch.cat([encoder(adapter.collate([views[i]])).float() for i in picks])
    scale = together.abs().max().clamp_min(1e-6)
    ok = bool(((together[picks] - alone).abs().max() / scale) < 1e-3)
    return check("collate keeps each sample in its row", ok,
                 "row i of collate(views) is not view i (compared through the encoder, each view collated alone); "
                 "keep the views' order: labels are matched to rows by position")


def _check_reload(adapter: Modality, encoder: torch.nn.Module, samples: list, check: Any) -> None:
    """What `dmssl.load` does: a fresh adapter, `restore_inference_state` (no `load`), `build_encoder`, the
    trained weights; its test-view features must equal the trained adapter's."""
    import json

    try:
        state = adapter.inference_state()
        json.dumps(state)
    except Exception as err:
        check("inference_state is JSON", False, f"inference_state() failed or is not JSON-ready ({err}); return plain "
              "numbers, strings and lists (it is saved as model.json)")
        return
    try:
        fresh = type(adapter)(adapter.options, adapter.data, adapter.model)
        fresh.restore_inference_state(json.loads(json.dumps(state)))
        rebuilt = fresh.build_encoder()
        rebuilt.load_state_dict(encoder.state_dict())
    except Exception as err:
        check("encoder rebuilds from inference_state", False,
              f"a fresh adapter with restore_inference_state(inference_state()) could not rebuild the trained encoder "
              f"({type(err).__name__}: {err}); put what load() learns that build_encoder needs into inference_state")
        return
    encoder.eval()
    rebuilt.eval()
    with torch.no_grad():
        before = encoder(adapter.collate([adapter.test_view(s) for s in samples]))
        after = rebuilt(fresh.collate([fresh.test_view(s) for s in samples]))
    check("encoder rebuilds from inference_state", before.shape == after.shape and torch.allclose(before, after, atol=1e-5),
          "the rebuilt adapter and encoder give other features for the same samples; inference_state must hold "
          "everything load() learns that test_view, collate or build_encoder use")


def _check_raw(raw: Any, check: Any) -> bool:
    if not check("load returns RawData", isinstance(raw, RawData), f"load() must return dmssl.modality.RawData, got {type(raw).__name__}"):
        return False
    ok = check("train samples and labels align", len(raw.train) == len(raw.train_labels) > 0,
               f"{len(raw.train)} train samples vs {len(raw.train_labels)} labels (and at least one is needed)")
    ok &= check("test samples and labels align", len(raw.test) == len(raw.test_labels) > 0,
                f"{len(raw.test)} test samples vs {len(raw.test_labels)} labels (and at least one is needed)")
    k = raw.num_classes
    ok &= check("at least two classes", k >= 2, f"class_names has {k} entries")
    not_ints = [y for y in list(raw.train_labels) + list(raw.test_labels) if not isinstance(y, (int, np.integer))]
    if not check("labels are class indices (int)", not not_ints,
                 f"labels {sorted({repr(y) for y in not_ints})[:3]} are not ints; RawData holds class indices "
                 "0..K-1 (-1 for unknown), and class_names[i] is the name of class i: map names to indices in load()"):
        return False
    bad = [y for y in list(raw.train_labels) + list(raw.test_labels) if not (-1 <= y < k)]
    ok &= check("labels in range", not bad, f"labels {sorted(set(bad))[:5]} outside [0, {k}) (-1 marks unlabeled)")
    return ok


def _embed(encoder: torch.nn.Module, adapter: Modality, views: Sequence[Any]) -> torch.Tensor:
    with torch.no_grad():
        encoder.eval()
        return F.normalize(encoder(adapter.collate(list(views))).float(), dim=1)


def _check_label_preserving(adapter: Modality, encoder: torch.nn.Module, samples: list, labels: list, raw: RawData,
                            check: Any, seed: int) -> None:
    """A view should look more like its own sample than like a sample of another class.

    With a random encoder, similarity in feature space tracks similarity of inputs, so a view that
    swaps in another sample (and so another label) is caught, while real augmentations pass.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(raw.train_labels):
        if y >= 0:
            by_class.setdefault(y, []).append(i)
    # More pairs than the other checks use: a random encoder judges similarity noisily, and the
    # verdict should rest on the views, not on which few samples were drawn.
    extra = [i for i in torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(seed + 1)).tolist()
             if raw.train_labels[i] >= 0][:max(0, LABEL_CHECK_PAIRS - len(samples))]
    pairs = []
    for sample, y in [*zip(samples, labels, strict=True), *((raw.train[i], raw.train_labels[i]) for i in extra)]:
        others = [c for c in by_class if c != y]
        if y < 0 or not others:
            continue
        pairs.append((sample, raw.train[rng.choice(by_class[rng.choice(others)])]))
    if not pairs:
        return
    own = _embed(encoder, adapter, [adapter.test_view(s) for s, _ in pairs])
    foreign = _embed(encoder, adapter, [adapter.test_view(o) for _, o in pairs])
    for name in ("weak", "strong"):
        with seeded_rng(seed):
            views = getattr(adapter, f"{name}_views")([s for s, _ in pairs])
        if not isinstance(views, list) or len(views) != len(pairs):
            continue  # already reported by "{name}_views gives one view per sample"
        z = _embed(encoder, adapter, views)
        closer = ((z * own).sum(1) > (z * foreign).sum(1)).float().mean().item()
        check(f"{name} view keeps the label", closer >= LABEL_CHECK_THRESHOLD,
              f"only {closer:.0%} of {len(pairs)} {name} views are closer to their own sample than to a sample of another "
              f"class (at least {LABEL_CHECK_THRESHOLD:.0%} expected); a view must transform its sample, not replace it "
              "with another one")


def _check_learns(adapter: Modality, raw: RawData, samples: list, labels: list, check: Any, seed: int) -> None:
    known = [(s, y) for s, y in zip(samples, labels, strict=True) if y >= 0]
    if len(known) < 2:
        check("two training steps lower the loss", False, "fewer than 2 labeled samples among those drawn")
        return
    torch.manual_seed(seed)
    model = SSLModel(adapter.build_encoder(), raw.num_classes)
    objective = build_objective("supervised", None, raw.num_classes)
    # Small steps: large enough to lower the loss of a random net, small enough not to overshoot a pretrained one.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with seeded_rng(seed):
        batch = adapter.collate([adapter.weak(s) for s, _ in known])
    targets = torch.tensor([y for _, y in known])

    def loss() -> torch.Tensor:
        with seeded_rng(seed):  # the same dropout masks for every evaluation
            return objective(StepEmbeddings(model(batch), targets, model.prototypes), 0).loss

    model.train()
    before = float(loss().detach())
    for _ in range(2):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    after = float(loss().detach())
    check("two training steps lower the loss", after < before,
          f"the supervised loss on one batch went {before:.4f} -> {after:.4f}; check that the encoder's parameters are "
          "trainable and that collate keeps samples in order")


def _format(report: AdapterReport) -> str:
    lines = [f"{len(report.violations)} adapter check(s) failed:"] + [f"  - {v}" for v in report.violations]
    return "\n".join(lines)
