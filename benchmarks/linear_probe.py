"""The frozen encoder as a reference point: logistic regression on its features, with the run's own splits.

    python benchmarks/linear_probe.py recipe=text_sentiment data.root=../shared/data/imdb \
        data.dev_size=200 data.test_subset=1000 modality.max_length=64 --seeds 0 1 2 3 4 \
        --write docs/results/imdb.md --section probe-imdb

A semi-supervised run with a pretrained encoder should beat what the encoder already knows. For each seed
this takes exactly the labeled split, dev split, unlabeled pool and test subset that `train.py` draws with
the same overrides and seed (`split_run_data`), encodes them once with the untrained encoder (test views,
eval mode), and fits scikit-learn's logistic regression on the standardised features:

- `linear probe`: on the labeled split; the inverse regularisation C is chosen on dev accuracy.
- `self-training`: scikit-learn's `SelfTrainingClassifier` around that probe, on the labeled split plus
  `--pool` unlabeled samples; its confidence threshold is chosen on dev accuracy.
- `dev labels as training labels`: the probe fitted on the dev split's labels instead (C = 1), i.e. what
  the frozen features give with `data.dev_size` labels: a ceiling for any method that keeps the encoder
  frozen and only learns from more (pseudo-)labels.

Test accuracy is read only for the table. A sample drawn by several seeds is encoded once.

`--feature-cache`: for a recipe with `model.freeze=all` and `model.cached_views` > 0, read the clean views
from the run's own feature cache (dmssl/feature_cache.py; built as train.py builds it where it does not exist)
instead of encoding: the probe then sees the very features the runs train on (float16, in the cache's number
format), and a study of many splits of one data set (the 12 Amazon pairs) costs no encoding pass at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.speed import publish  # noqa: E402
from dmssl.data import check_raw_data  # noqa: E402
from dmssl.modality import build_adapter  # noqa: E402
from dmssl.recipe import resolve  # noqa: E402
from dmssl.trainer import cached_inputs, split_run_data  # noqa: E402

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
THRESHOLD_GRID = (0.6, 0.75, 0.9)
PROBES = ("linear probe", "self-training", "dev labels as training labels")


def sample_key(sample: Any) -> bytes:
    """Identity by content: an adapter may hand out a new object for the same sample (a row of an array)."""
    return hashlib.sha1(pickle.dumps(sample)).digest()


class FeatureCache:
    """Frozen-encoder features of samples, each computed once (the seeds draw from the same loaded data)."""

    def __init__(self, adapter: Any, batch_size: int) -> None:
        self.adapter, self.batch_size = adapter, batch_size
        self.encoder = adapter.build_encoder().eval()
        self.features: dict[bytes, np.ndarray] = {}
        self.encode_seconds = 0.0  # the encoder's own time (views and collate included), for the report

    @torch.no_grad()
    def __call__(self, samples: list) -> np.ndarray:
        keys = [sample_key(s) for s in samples]
        missing = list({k: s for k, s in zip(keys, samples) if k not in self.features}.items())
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i: i + self.batch_size]
            started = time.perf_counter()
            batch = self.adapter.collate([self.adapter.test_view(s) for _, s in chunk])
            self.features.update(zip((k for k, _ in chunk), self.encoder(batch).float().numpy()))
            self.encode_seconds += time.perf_counter() - started
        if not samples:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.features[k] for k in keys])


class RunFeatureCache:
    """The clean-view features in train.py's feature cache, for the splits a seed draws (cached_inputs)."""

    def __init__(self, adapter: Any, raw: Any, encoder: Any) -> None:
        from accelerate import PartialState

        from dmssl.pretrained import apply_freeze

        self.adapter, self.raw, self.encoder = adapter, raw, encoder
        apply_freeze(encoder, "all")
        self.process = PartialState(cpu=not torch.cuda.is_available())
        self.views: Any = None

    def rows(self, data: Any, cfg: Any) -> Any:
        """The run's data with samples as cache rows; opens (or builds) the cache."""
        self.views, rows = cached_inputs(self.adapter, self.raw, data, self.encoder, cfg, self.process)
        return rows

    def __call__(self, samples: list) -> np.ndarray:
        if not samples:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.views.test_view(s).numpy() for s in samples])


def logistic_regression(C: float) -> Any:
    """Standardised features, then logistic regression: C then means the same on any encoder's feature scale."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))


def choose_on_dev(candidates: dict[Any, Any], dev_x: np.ndarray, dev_y: np.ndarray) -> tuple[Any, Any]:
    """(setting, fitted model) with the best dev accuracy; the first of the grid when there is no dev split."""
    if len(dev_y) == 0:
        return next(iter(candidates.items()))
    return max(candidates.items(), key=lambda item: item[1].score(dev_x, dev_y))


def probe_seed(overrides: list[str], seed: int, raw: Any, cache: FeatureCache | RunFeatureCache,
                pool_size: int) -> dict[str, Any]:
    from sklearn.semi_supervised import SelfTrainingClassifier

    cfg = resolve([*overrides, f"seed={seed}"])
    data = split_run_data(raw, cfg)
    if isinstance(cache, RunFeatureCache):
        data = cache.rows(data, cfg)
    x_lab, y_lab = cache(data.labeled), np.asarray(data.labeled_labels)
    x_dev, y_dev = cache(data.dev), np.asarray(data.dev_labels)
    x_test, y_test = cache(data.test), np.asarray(data.test_labels)
    # The pool is already in the run's seeded order; its head is a seeded sample of it.
    x_pool = cache([sample for sample, _ in data.pool[:pool_size]])

    C, probe = choose_on_dev({c: logistic_regression(c).fit(x_lab, y_lab) for c in C_GRID}, x_dev, y_dev)
    x_semi = np.concatenate([x_lab, x_pool])
    y_semi = np.concatenate([y_lab, -np.ones(len(x_pool), dtype=int)])
    with warnings.catch_warnings():  # it warns when an iteration adds no sample, which is a normal stop
        warnings.simplefilter("ignore", UserWarning)
        threshold, self_trained = choose_on_dev(
            {t: SelfTrainingClassifier(logistic_regression(C), threshold=t).fit(x_semi, y_semi) for t in THRESHOLD_GRID},
            x_dev, y_dev)
    result = {"seed": seed, "labeled": len(y_lab), "dev": len(y_dev), "test": len(y_test), "pool": len(x_pool),
              "C": C, "threshold": threshold,
              "dev_accuracy": {"linear probe": probe.score(x_dev, y_dev) if len(y_dev) else None,
                               "self-training": self_trained.score(x_dev, y_dev) if len(y_dev) else None},
              "test_accuracy": {"linear probe": probe.score(x_test, y_test),
                                "self-training": self_trained.score(x_test, y_test)}}
    if len(set(y_dev.tolist())) > 1:
        result["test_accuracy"]["dev labels as training labels"] = logistic_regression(1.0).fit(x_dev, y_dev).score(x_test, y_test)
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * std:.2f}"


def render(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    first = seeds[0]
    lines = [f"`{report['command']}` ({report['date']}; frozen {report['encoder']}, {first['labeled']} labels, "
             f"{first['dev']} dev, {first['pool']} unlabeled for self-training, {first['test']} test samples a seed)",
             "", "| probe | trained on | dev accuracy | test accuracy | seeds | per seed (test) |", "|---|---|---|---|---|---|"]
    trained_on = {"linear probe": f"{first['labeled']} labels", "self-training": f"{first['labeled']} labels + {first['pool']} unlabeled",
                  "dev labels as training labels": f"the {first['dev']} dev labels"}
    for name in PROBES:
        test = [s["test_accuracy"][name] for s in seeds if name in s["test_accuracy"]]
        if not test:
            continue
        dev = [s["dev_accuracy"].get(name) for s in seeds]
        dev_text = mean_std(dev) if all(d is not None for d in dev) else "-"
        per_seed = ", ".join(f"{100 * t:.1f}" for t in test)
        lines.append(f"| {name} | {trained_on[name]} | {dev_text} | **{mean_std(test)}** | {len(test)} | {per_seed} |")
    chosen = ", ".join(f"seed {s['seed']}: C={s['C']:g}, threshold={s['threshold']:g}" for s in seeds)
    lines += ["", f"Chosen on dev: {chosen}."]
    if report.get("encoded"):
        lines += ["", f"Encoded {report['encoded']:,} samples in {report['encode_seconds']:.1f} s "
                  f"({report['encoded'] / max(report['encode_seconds'], 1e-9):.1f} samples/s, "
                  f"{report['threads']} thread(s))."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="recipe=... and key=value overrides, as for train.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=2000, help="unlabeled samples for self-training (default 2000)")
    parser.add_argument("--feature-cache", action="store_true",
                        help="read the clean views from the runs' feature cache (model.cached_views > 0) instead of encoding")
    parser.add_argument("--json", type=Path, help="write the raw report here")
    parser.add_argument("--write", type=Path, help="replace a section of this markdown file (needs --section)")
    parser.add_argument("--section", default="probe", help="the <!-- SECTION:start/end --> markers to write between")
    args = parser.parse_args(argv)
    cfg = resolve([*args.overrides, f"seed={args.seeds[0]}"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    check_raw_data(raw, needs_test=not cfg.data.transductive_test)
    torch.manual_seed(cfg.seed)  # an encoder without pretrained weights is the first seed's random init
    cache: FeatureCache | RunFeatureCache = FeatureCache(adapter, cfg.data.eval_batch_size)
    if args.feature_cache:
        if cfg.model.cached_views < 1:
            parser.error(f"--feature-cache reads the runs' feature cache; model.cached_views={cfg.model.cached_views} "
                         "makes none (allowed: 1 or more)")
        cache = RunFeatureCache(adapter, raw, cache.encoder)
    seeds = []
    for seed in args.seeds:
        seeds.append(probe_seed(args.overrides, seed, raw, cache, args.pool))
        print(json.dumps({k: seeds[-1][k] for k in ("seed", "C", "threshold", "test_accuracy")}), flush=True)
    encoder = getattr(cfg.modality.options, "pretrained", None) or cfg.model.encoder
    report = {"command": "python benchmarks/linear_probe.py " + " ".join(sys.argv[1:] if argv is None else argv), "date": date.today().isoformat(),
              "encoder": encoder, "seeds": seeds}
    if isinstance(cache, FeatureCache):  # what encoding cost (the run's feature cache was paid for before)
        report |= {"encoded": len(cache.features), "encode_seconds": round(cache.encode_seconds, 2),
                   "threads": torch.get_num_threads()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    publish(render(report), args.write, args.section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
