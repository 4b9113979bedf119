"""A study's table from finished run folders: dev and test accuracy per setting, mean +- std over seeds.

    python benchmarks/study_table.py \
        --row "-" runs/cifar-study/base/cifar10/supervised-s* \
        --row "fixed, labeled_ce_weight=1" runs/cifar-study/ce1/cifar10/dmssl-mmd-s* \
        --commit 115a40f --write docs/results/cifar10.md --section study-cifar10

Each --row is a label for the setting and the run folders of its seeds (a shell glob, or a quoted one that
this script expands). The objective, the seed and the accuracies come from each run's summary.json, so the
table says what ran, not what a command line meant to run. quality.py makes one grid under one setting;
a study compares several settings (one quality.py --runs folder each), and this is where they meet.
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


def table(rows: list[tuple[str, list[dict[str, Any]]]]) -> str:
    lines = ["| setting | objective | dev accuracy | test accuracy | seeds | per seed (test) |",
             "|---|---|---|---|---|---|"]
    for label, runs in rows:
        objectives = sorted({str(r["objective"]) for r in runs})
        if len(objectives) != 1:
            raise SystemExit(f"row {label!r} mixes objectives {objectives}: one row is one objective")
        dev = [r["dev_accuracy"] for r in runs if r.get("dev_accuracy") is not None]
        test = [r["test_accuracy"] for r in runs]
        per_seed = ", ".join(f"{100 * t:.1f}" for t in test)
        lines.append(f"| {label} | {objectives[0]} | {mean_std(dev)} | **{mean_std(test)}** | {len(runs)} | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar=("LABEL", "RUN_DIR"),
                        help="a setting's label, then its run folders (globs allowed)")
    parser.add_argument("--commit", help="the commit the runs ran at, for the table's first line (default: the "
                        "code_version their summary.json files record)")
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
    versions = sorted({str(r["code_version"]) for _, runs in rows for r in runs if r.get("code_version")})
    commit = args.commit or ", ".join(versions)
    first = f"Measured {date.today().isoformat()}" + (f" at commit {commit}" if commit else "")
    threads = sorted({str(r.get("cpu_threads", "?")) for _, runs in rows for r in runs})
    body = f"{first}; {'/'.join(threads)} CPU thread(s) per run.\n\n{table(rows)}"
    print(body)
    if args.write:
        write_section(args.write, args.section, body)


if __name__ == "__main__":
    main()
