"""A study's table from finished run folders: dev and test accuracy per setting, mean +- std over seeds.

    python benchmarks/study_table.py \
        --row "-" runs/cifar-study/base/cifar10/supervised-s* \
        --row "fixed, labeled_ce_weight=1" runs/cifar-study/ce1/cifar10/dmssl-mmd-s* \
        --commit 115a40f --write docs/results/cifar10.md --section study-cifar10

Each --row is a label for the setting and the run folders of its seeds (a shell glob, or a quoted one that
this script expands). The objective, the seed and the accuracies come from each run's summary.json, so the
table says what ran, not what a command line meant to run. quality.py makes one grid under one setting;
a study compares several settings (one quality.py --runs folder each), and this is where they meet.

`--paired N` adds, for every other row, its paired difference from row N (1-based) over the seeds both have
(the seeds share labels and splits): row N minus that row's test accuracy, the standard error of the
differences, and on how many seeds row N is ahead. "Leads by two paired standard errors" is read off it.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.pairs_table import paired  # noqa: E402
from benchmarks.speed import write_section  # noqa: E402


def read_runs(patterns: list[str]) -> list[dict[str, Any]]:
    """summary.json of every run folder the patterns name, in seed order; a folder without one is an error."""
    folders = sorted({Path(p) for pattern in patterns for p in (glob.glob(pattern) or [pattern])})
    summaries = []
    for folder in folders:
        path = folder / "summary.json"
        if not path.is_file():
            raise SystemExit(f"{folder} has no summary.json: the run did not finish (or the path is wrong)")
        summaries.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(summaries, key=lambda s: s.get("seed", 0))


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * std:.2f}"


def by_seed(runs: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r.get("seed", 0)): r["test_accuracy"] for r in runs}


def paired_cell(reference: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """'+4.20 (SE 1.10, t 3.8), ahead on 3/3' in points: the reference row minus this one, seed by seed."""
    ref, other = by_seed(reference), by_seed(runs)
    shared = sorted(set(ref) & set(other))
    if not shared:
        return "no shared seed"
    diff, se = paired({s: ref[s] for s in shared}, {s: other[s] for s in shared})
    ahead = sum(ref[s] > other[s] for s in shared)
    t = f", t {diff / se:.1f}" if se == se and se > 0 else ""
    se_text = f"SE {100 * se:.2f}" if se == se else "SE -"
    return f"{100 * diff:+.2f} ({se_text}{t}), ahead on {ahead}/{len(shared)}"


def table(rows: list[tuple[str, list[dict[str, Any]]]], paired_with: int | None = None) -> str:
    head = "| setting | objective | dev accuracy | test accuracy | seeds | per seed (test) |"
    rule = "|---|---|---|---|---|---|"
    if paired_with is not None:
        head += f" row {paired_with} minus this row (paired) |"
        rule += "---|"
    lines = [head, rule]
    for index, (label, runs) in enumerate(rows, start=1):
        objectives = sorted({str(r["objective"]) for r in runs})
        if len(objectives) != 1:
            raise SystemExit(f"row {label!r} mixes objectives {objectives}: one row is one objective")
        dev = [r["dev_accuracy"] for r in runs if r.get("dev_accuracy") is not None]
        test = [r["test_accuracy"] for r in runs]
        per_seed = ", ".join(f"{100 * t:.1f}" for t in test)
        line = f"| {label} | {objectives[0]} | {mean_std(dev)} | **{mean_std(test)}** | {len(runs)} | {per_seed} |"
        if paired_with is not None:
            line += " - |" if index == paired_with else f" {paired_cell(rows[paired_with - 1][1], runs)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar=("LABEL", "RUN_DIR"),
                        help="a setting's label, then its run folders (globs allowed)")
    parser.add_argument("--commit", help="the commit the runs ran at, for the table's first line (default: the "
                        "code_version their summary.json files record)")
    parser.add_argument("--paired", type=int, metavar="N", help="add each row's paired difference from row N "
                        "(1-based, in --row order)")
    parser.add_argument("--write", type=Path, help="replace a section of this markdown file")
    parser.add_argument("--section", help="the section's marker name (<!-- NAME:start -->)")
    args = parser.parse_args(argv)
    if bool(args.write) != bool(args.section):
        parser.error("--write and --section go together")
    rows = []
    for row in args.row:
        if len(row) < 2:
            parser.error(f"--row {row[0]!r} names no run folder")
        rows.append((row[0], read_runs(row[1:])))
    if args.paired is not None and not 1 <= args.paired <= len(rows):
        parser.error(f"--paired {args.paired}: there are rows 1 to {len(rows)}")
    versions = sorted({str(r["code_version"]) for _, runs in rows for r in runs if r.get("code_version")})
    commit = args.commit or ", ".join(versions)
    first = f"Measured {date.today().isoformat()}" + (f" at commit {commit}" if commit else "")
    threads = sorted({str(r.get("cpu_threads", "?")) for _, runs in rows for r in runs})
    body = f"{first}; {'/'.join(threads)} CPU thread(s) per run.\n\n{table(rows, args.paired)}"
    print(body)
    if args.write:
        write_section(args.write, args.section, body)


if __name__ == "__main__":
    main()
