"""One table for a benchmark of many source -> target pairs: a row per pair, a column per method, and the average.

    python benchmarks/pairs_table.py runs/amazon --preset amazon_shift \
        --write docs/results/amazon.md --section amazon-pairs

`RUNS/<source>-<target>/` holds a pair's runs (`<preset>/<cell>-s<seed>/summary.json`, as quality.py writes
them) and, where it was run, its `probe.json` (benchmarks/linear_probe.py --json). Each cell is the test
accuracy averaged over the pair's seeds; the last columns give dmssl (MMD, the recipe's) minus the best other
method of the pair, and that difference's paired standard error over seeds (the seeds share labels and splits).
Where the runs recorded a shift report, a column gives its z (the mean over the pair's runs). A second table
pairs dmssl with each other method over every (pair, seed) run: mean difference, paired SE, pairs ahead.
A pair whose runs are not all finished is left out and named, never averaged in part.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.speed import publish  # noqa: E402

PROBE = "linear probe"
RECIPE = "dmssl-mmd"
NAMES = {PROBE: "probe", "supervised": "source only", "fixmatch": "FixMatch", "sscl": "sscl", "dmssl-mmd": "dmssl (MMD)",
         "dmssl-coral": "dmssl + CORAL", "dmssl-adversarial": "dmssl + adversarial",
         "dmssl-cdan": "dmssl + CDAN"}


def read_pair(folder: Path, preset: str) -> dict[str, dict[int, float]]:
    """{method: {seed: test accuracy}} of one pair: its runs' summaries and its probe's report."""
    methods: dict[str, dict[int, float]] = {}
    for summary in sorted((folder / preset).glob("*-s*/summary.json")):
        cell, _, seed = summary.parent.name.rpartition("-s")
        methods.setdefault(cell, {})[int(seed)] = json.loads(summary.read_text())["test_accuracy"]
    probe = folder / "probe.json"
    if probe.is_file():
        for row in json.loads(probe.read_text())["seeds"]:
            methods.setdefault(PROBE, {})[int(row["seed"])] = row["test_accuracy"][PROBE]
    return methods


def shift_z(folder: Path, preset: str) -> float | None:
    """The pair's shift report, as the mean z over its runs' summaries that hold one (None: none does)."""
    values = [json.loads(p.read_text()).get("shift") for p in sorted((folder / preset).glob("*-s*/summary.json"))]
    zs = [v["z"] for v in values if isinstance(v, dict) and "z" in v]
    return statistics.mean(zs) if zs else None


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """(mean of a - b over the seeds both have, its standard error)."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    return statistics.mean(diffs), standard_error_of(diffs)


def standard_error_of(diffs: list[float]) -> float:
    """The standard error of the mean of `diffs` (nan for a single one)."""
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")


def standard_error(se: float, digits: int) -> str:
    """A standard error in points, or "-" where one seed (one run) leaves it undefined."""
    return "-" if math.isnan(se) else f"{100 * se:.{digits}f}"


def render(pairs: dict[str, dict[str, dict[int, float]]], methods: list[str], skipped: list[str],
           shifts: dict[str, float | None] | None = None) -> str:
    with_shift = bool(shifts) and any(z is not None for z in shifts.values())
    head = ("| pair | " + ("shift z | " if with_shift else "") + " | ".join(NAMES.get(m, m) for m in methods)
            + " | dmssl - best other | paired SE |")
    lines = [head, "|---" * (len(methods) + 3 + with_shift) + "|"]
    means: dict[str, list[float]] = {m: [] for m in methods}
    for pair, results in pairs.items():
        row = {m: statistics.mean(results[m].values()) for m in methods}
        for m in methods:
            means[m].append(row[m])
        others = [m for m in methods if m != RECIPE]
        best = max(others, key=lambda m: row[m])
        diff, se = paired(results[RECIPE], results[best])
        top = max(row.values())
        cells = [f"**{100 * row[m]:.1f}**" if row[m] == top else f"{100 * row[m]:.1f}" for m in methods]
        z = (shifts or {}).get(pair)
        shift = (f"{z:.1f} | " if z is not None else "- | ") if with_shift else ""
        lines.append(f"| {pair.replace('-', ' -> ')} | {shift}" + " | ".join(cells)
                     + f" | {100 * diff:+.1f} ({NAMES.get(best, best)}) | {standard_error(se, 1)} |")
    average = {m: statistics.mean(v) for m, v in means.items()}
    top = max(average.values())
    lines.append("| **average** | " + ("| " if with_shift else "") + " | ".join(f"**{100 * average[m]:.1f}**" if average[m] == top
                                                  else f"{100 * average[m]:.1f}" for m in methods) + " | | |")
    seeds = sorted({s for r in pairs.values() for v in r.values() for s in v})
    lines += ["", f"{len(pairs)} pairs, seeds {seeds}; each cell the mean test accuracy over the seeds."
              + (" Shift z: the shift report's z (labeled against unlabeled embeddings of the starting encoder, "
                 "against a permutation noise floor), the mean over the pair's runs." if with_shift else "")]
    if skipped:
        lines.append(f"Not finished, left out: {', '.join(skipped)}.")
    return "\n".join(lines) + "\n"


def render_paired(pairs: dict[str, dict[str, dict[int, float]]], methods: list[str]) -> str:
    """dmssl (the recipe's) minus each other method over every (pair, seed) run both have: mean, paired SE, and
    the pairs where dmssl's mean is ahead."""
    runs = sum(len(results[RECIPE]) for results in pairs.values())
    lines = [f"Paired over the {runs} runs ({len(pairs)} pairs; the same labels, dev split and pool for each pair "
             "and seed), dmssl (MMD) minus each other row:", "",
             f"| dmssl (MMD) minus | mean | paired SE ({runs} runs) | pairs where dmssl is ahead |", "|---|---|---|---|"]
    for other in (m for m in methods if m != RECIPE):
        diffs = [results[RECIPE][s] - results[other][s] for results in pairs.values()
                 for s in sorted(set(results[RECIPE]) & set(results[other]))]
        se = standard_error_of(diffs)
        ahead = sum(statistics.mean(r[RECIPE].values()) > statistics.mean(r[other].values()) for r in pairs.values())
        lines.append(f"| {NAMES.get(other, other)} | {100 * statistics.mean(diffs):+.2f} | {standard_error(se, 2)} | "
                     f"{ahead} of {len(pairs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder of <source>-<target> pair folders")
    parser.add_argument("--preset", required=True, help="the quality.py preset the runs were made with")
    parser.add_argument("--write", type=Path, help="replace a section of this markdown file (needs --section)")
    parser.add_argument("--section", default="pairs")
    args = parser.parse_args(argv)
    found = {folder.name: read_pair(folder, args.preset) for folder in sorted(args.runs.iterdir()) if folder.is_dir()}
    methods = [m for m in NAMES if any(m in r for r in found.values())]
    complete = {p: r for p, r in found.items()
                if all(m in r for m in methods) and len({len(r[m]) for m in methods}) == 1}
    if not complete or RECIPE not in methods:
        raise SystemExit(f"no pair under {args.runs} has every method finished (and {RECIPE} among them)")
    shifts = {pair: shift_z(args.runs / pair, args.preset) for pair in complete}
    text = render(complete, methods, sorted(set(found) - set(complete)), shifts) + "\n" + render_paired(complete, methods)
    publish(text, args.write, args.section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
