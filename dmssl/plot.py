"""Figures of finished runs: `python -m dmssl.plot RUN_DIR [RUN_DIR ...]`.

Writes into each RUN_DIR/plots/:
    curves.png      test accuracy (EMA), mask rate and pseudo-label accuracy over steps
    distance.png    the distribution-matching distance (and the loss terms) over steps
    embeddings.png  a 2-D projection of labeled vs unlabeled embeddings at the start and the end
    confusion.png   the test confusion matrix (row-normalised: each row is one true class), with counts
With several run folders, also `--compare OUT.png`: their end-of-run embeddings side by side (e.g. with
and without matching). The projection is PCA, or t-SNE with `--tsne` (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dmssl.errors import CheckpointError, UserError


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log; a torn last line (a run killed while writing) is left out, other bad lines
    are an error naming the file and line."""
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise CheckpointError(f"{path} line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CheckpointError(f"{path} line {number} is not a log record (a JSON object with a step)")
        records.append(record)
    return records


def read_json(path: Path) -> dict[str, Any]:
    from dmssl.classifier import read_json_file

    return read_json_file(path) if path.is_file() else {}


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def project(points: np.ndarray, tsne: bool, seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2): PCA by SVD, or t-SNE."""
    if tsne:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(points) - 1)).fit_transform(points)
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_run(run_dir: Path, tsne: bool = False) -> list[Path]:
    """Render the figures of one run folder; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dir.is_dir():
        raise CheckpointError(f"{str(run_dir)!r} is not a folder; give a dmssl run folder")
    metrics, train = read_lines(run_dir / "metrics.jsonl"), read_lines(run_dir / "train.jsonl")
    if not metrics:
        raise CheckpointError(f"{run_dir} has no metrics.jsonl records; is it a dmssl run folder that trained?")
    summary = read_json(run_dir / "summary.json")
    confusion = read_json(run_dir / "confusion_matrix.json")
    out = run_dir / "plots"  # made only once the folder is known to be a run's
    try:
        out.mkdir(exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot write {out} ({err.strerror or err})") from None
    title = f"{summary.get('recipe', run_dir.name)}: {summary.get('objective', '')} {summary.get('distance') or ''}".strip()
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(metrics, "test_accuracy"), marker="o", label="test accuracy (EMA)")
    for key, label in (("mask_rate", "mask rate"), ("pseudo_label_accuracy", "pseudo-label accuracy")):
        steps, values = series(train or metrics, key)
        if steps:
            ax.plot(steps, values, label=label, alpha=0.8)
    ax.set(xlabel="step", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    written.append(out / "curves.png")
    plt.close(fig)

    steps, values = series(train or metrics, "distance")
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, values, color="tab:purple")
        ax.set(xlabel="step", ylabel="distance D(labeled, unlabeled)", title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "distance.png", dpi=110)
        written.append(out / "distance.png")
        plt.close(fig)

    if confusion:
        written.append(plot_confusion(confusion, out / "confusion.png", title))

    snapshots = sorted((run_dir / "embeddings").glob("step_*.npz"))
    if len(snapshots) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, path in zip(axes, (snapshots[0], snapshots[-1]), strict=True):
            draw_embeddings(ax, path, tsne, f"step {int(path.stem.split('_')[1])}")
        axes[0].legend(loc="best", fontsize=8)
        fig.suptitle(f"{title}: labeled (o) vs unlabeled (.), colour = class")
        fig.tight_layout()
        fig.savefig(out / "embeddings.png", dpi=110)
        written.append(out / "embeddings.png")
        plt.close(fig)
    return written


def plot_confusion(confusion: dict[str, Any], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix as a heat map; cells carry their counts."""
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion["matrix"], dtype=float)
    names = confusion.get("class_names") or [str(k) for k in range(len(counts))]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 2.5 + 0.5 * len(names))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted class", ylabel="true class",
           title=f"{title}\naccuracy {confusion['accuracy']:.3f}, macro-F1 {confusion['macro_f1']:.3f}")
    ax.set_xticklabels(names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_embeddings(ax: Any, path: Path, tsne: bool, title: str) -> None:
    with np.load(path) as data:
        z, targets, labeled = data["embeddings"], data["targets"], data["is_labeled"]
    xy = project(z, tsne)
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    ax.scatter(xy[~labeled, 0], xy[~labeled, 1], s=6, alpha=0.35, c=[colours(t % 10) for t in targets[~labeled]])
    ax.scatter(xy[labeled, 0], xy[labeled, 1], s=40, edgecolors="black", linewidths=0.6,
               c=[colours(t % 10) for t in targets[labeled]])
    # Grey legend markers: the colours mean classes, the marker kind means labeled or not.
    ax.scatter([], [], s=6, c="grey", label="unlabeled")
    ax.scatter([], [], s=40, c="grey", edgecolors="black", linewidths=0.6, label="labeled")
    ax.set(title=title, xticks=[], yticks=[])


def compare(run_dirs: list[Path], out: Path, tsne: bool = False) -> Path:
    """End-of-run embeddings of several runs side by side (e.g. sscl vs dmssl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 4.5), squeeze=False)
    for ax, run_dir in zip(axes[0], run_dirs, strict=True):
        summary = read_json(run_dir / "summary.json")
        snapshots = sorted((run_dir / "embeddings").glob("step_*.npz"))
        if not summary or not snapshots:
            raise CheckpointError(f"--compare: {run_dir} has no summary.json or no embeddings/ (a finished run "
                                  "with trainer.save_embeddings=true)")
        last = snapshots[-1]
        name = f"{summary['objective']} {summary.get('distance') or ''}".strip()
        draw_embeddings(ax, last, tsne, f"{name}: test acc {summary['test_accuracy']:.3f}")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmssl plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--tsne", action="store_true", help="t-SNE instead of PCA for the embedding plots")
    parser.add_argument("--compare", type=Path, help="also write the runs' final embeddings side by side here")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            for path in plot_run(run_dir, args.tsne):
                print(path)
        if args.compare:
            print(compare(args.run_dirs, args.compare, args.tsne))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
