"""Quality benchmark: objective x distance x seed grid on one modality's real data, mean +- std accuracy.

    python benchmarks/quality.py digits --seeds 0 1 2 --write docs/results/digits.md
    python benchmarks/quality.py cifar10 --data ../shared/data/cifar10/cifar10-jpg.tar.gz --minutes 15
    python benchmarks/quality.py fsdd --data ../shared/data/fsdd/fsdd-recordings.tar.gz --minutes 15
    python benchmarks/quality.py imdb --data ../shared/data/imdb --minutes 20
    # on a GPU, the full protocol: e.g. cifar10 --steps 1048576 --extra model.encoder=wrn28_2
    # an ablation: some cells, extra overrides, its own runs folder
    python benchmarks/quality.py fsdd --data PATH --steps 500 --cells dmssl:mmd \
        --extra objective.dm_warmup_steps=250 --runs runs/quality-warmup
    # an option of one objective only (sscl has no lambda_dm): --cell-extra
    python benchmarks/quality.py digits --cells sscl dmssl:mmd --cell-extra dmssl:mmd objective.lambda_dm=3
    # every cell of one objective, whatever its distance (a grid with none of them: nothing to add)
    python benchmarks/quality.py digits --cells sscl dmssl:mmd dmssl:coral --cell-extra 'dmssl:*' objective.lambda_dm=1

Every cell is a `train.py` run (a subprocess) under the same budget; a finished run whose config.yaml
equals the cell's resolved config is reused (its summary.json), so an interrupted grid continues where it
stopped and a changed budget reruns the cell. Raw results go to a JSON file, the
table to stdout and, with --write, into the `quality-<modality>` section of a markdown file.

`--jobs N` runs N cells at a time, each with its share of the CPU's threads (OMP_NUM_THREADS = cores / N,
unless set): for runs on cached frozen features, whose steps are too small to use every core, that finishes a
grid sooner. Each run is seeded, but its floating-point sums follow the thread count, and a long run from random
weights can end points apart on another count: compare rows run at one thread count (the summaries record it,
and the table's first line names it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.speed import write_section  # noqa: E402
from dmssl.config import DataConfig, ModelConfig, TrainerConfig, config_to_dict, flatten  # noqa: E402
from dmssl.recipe import resolve  # noqa: E402

PRESETS: dict[str, list[str]] = {
    "digits": ["recipe=quickstart"],
    "cifar10": ["recipe=image_cifar10", "model.encoder=small_cnn", "data.num_labels=250"],
    "fsdd": ["recipe=audio_fsdd"],
    "fsdd_pretrained": ["recipe=audio_fsdd_pretrained"],  # --extra modality.pretrained=PATH/whisper-tiny.en
    "cifar10_pretrained": ["recipe=image_cifar10_pretrained"],  # --extra modality.pretrained=PATH/tf_efficientnet_lite0
    "imdb": ["recipe=text_sentiment", "data.labels_per_class=10"],
    "digits_shift": ["recipe=image_digits_shift"],  # --data PATH/digits-usps-mnist.tar.gz
    "imdb_pretrained": ["recipe=text_sentiment_mpnet"],  # --extra modality.pretrained=PATH (mpnet, or MiniLM's folder)
    "amazon_shift": ["recipe=text_amazon_shift"],  # --extra modality.train_files=[PATH/amazon-multidomain.jsonl.gz]
}
CELLS = [("supervised", None), ("fixmatch", None), ("sscl", None), ("dmssl", "cosine"), ("dmssl", "mmd"),
         ("dmssl", "wasserstein")]
# Cells that --cells accepts beyond the default grid.
EXTRA_CELLS = [("fixmatch_proto", None), ("dmssl", "coral"), ("dmssl", "adversarial"), ("dmssl", "cdan")]


def cell_text(cell: tuple[str, str | None]) -> str:
    """('dmssl', 'mmd') -> 'dmssl:mmd'; ('sscl', None) -> 'sscl': how --cells names a cell."""
    objective, distance = cell
    return f"{objective}:{distance}" if distance else objective


def parse_cell(text: str) -> tuple[str, str | None]:
    """'sscl' -> ('sscl', None); 'dmssl:mmd' -> ('dmssl', 'mmd'); only cells of the full grid."""
    objective, _, distance = text.partition(":")
    cell = (objective, distance or None)
    if cell not in CELLS + EXTRA_CELLS:
        allowed = ", ".join(map(cell_text, CELLS + EXTRA_CELLS))
        raise argparse.ArgumentTypeError(f"unknown cell {text!r}; allowed: {allowed}")
    return cell


def finished_with_same_config(run_dir: Path, overrides: list[str]) -> bool:
    """A finished run is reused only if these overrides resolve to the config it ran with, so that a grid
    with another budget or other extras never picks up stale results from the same folder."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    wanted = flatten(config_to_dict(resolve(overrides)))
    saved = flatten(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    # A key added to the schema after the run was saved counts as equal when the cell leaves it at its default.
    defaults = flatten({"data": asdict(DataConfig()), "model": asdict(ModelConfig()), "trainer": asdict(TrainerConfig())})
    missing = object()
    return set(saved) <= set(wanted) and all(saved.get(k, defaults.get(k, missing)) == v for k, v in wanted.items())


def cell_command(args: argparse.Namespace, objective: str, distance: str | None, seed: int) -> tuple[list[str], Path]:
    """The `train.py` command line of one cell and seed, and its run folder."""
    name = f"{objective}-{distance}-s{seed}" if distance else f"{objective}-s{seed}"
    out = args.runs / args.modality / name
    command = [sys.executable, str(ROOT / "train.py"), *PRESETS[args.modality], f"objective.name={objective}",
               f"seed={seed}", f"output_dir={out}", "overwrite=true", "trainer.progress_bar=false",
               "trainer.save_embeddings=false"]
    if distance:
        command.append(f"distance.name={distance}")
    if args.data:
        command.append(f"data.root={args.data}")
    if args.steps:
        command.append(f"trainer.max_steps={args.steps}")
        if not args.minutes:
            command.append("trainer.max_minutes=null")  # a pure step budget: the same result on any machine
    if args.minutes:
        command += [f"trainer.max_minutes={args.minutes}"] + ([] if args.steps else ["trainer.max_steps=100000000"])
    command += args.extra + args.cell_extra.get((objective, distance), [])
    return command, out


def run_cell(args: argparse.Namespace, objective: str, distance: str | None, seed: int) -> dict[str, Any]:
    command, out = cell_command(args, objective, distance, seed)
    if finished_with_same_config(out, command[2:]):
        return json.loads((out / "summary.json").read_text())
    print("+", " ".join(command[1:]), flush=True)
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def describe_runs_machine(summaries: list[dict[str, Any]]) -> str:
    """Where the runs ran, from their own summaries (a grid may be rendered on another machine, or with
    another thread count, than the one that trained it)."""
    import torch

    devices = sorted({str(s.get("device", "?")) for s in summaries})
    if any(d.startswith("cuda") for d in devices):
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "GPU"
        return f"{name} ({', '.join(devices)})"
    threads = sorted({s["cpu_threads"] for s in summaries if "cpu_threads" in s})
    if not threads:  # runs written before summaries recorded it: assume this process's count (set OMP_NUM_THREADS)
        return f"CPU, {torch.get_num_threads()} thread(s) per run"
    count = str(threads[0]) if len(threads) == 1 else f"{threads[0]}-{threads[-1]}"
    return f"CPU, {count} thread(s) per run"


def render(report: dict[str, Any]) -> str:
    budget = (f"{report['steps']} steps" if report["steps"] else "") + \
             (f"{' or ' if report['steps'] else ''}{report['minutes']} minutes per run" if report["minutes"] else "")
    has_dev = any(row.get("dev_accuracies") for row in report["rows"])
    lines = [f"`{report['command']}`", "",
             f"Budget: {budget or 'the recipe default'}; seeds {report['seeds']}; {report['machine']}; {report['date']}.", "",
             "| objective | distance | " + ("dev accuracy | " if has_dev else "")
             + "test accuracy (mean +- std) | steps (mean) | per seed (test) |",
             "|---|---|" + ("---|" if has_dev else "") + "---|---|---|"]
    for row in report["rows"]:
        acc = row["accuracies"]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        dev = row.get("dev_accuracies") or []
        dev_cell = (f"{100 * statistics.mean(dev):.2f} +- {100 * (statistics.stdev(dev) if len(dev) > 1 else 0.0):.2f} | "
                    if dev else "- | ") if has_dev else ""
        lines.append(f"| {row['objective']} | {row['distance'] or '-'} | {dev_cell}{100 * statistics.mean(acc):.2f} +- "
                     f"{100 * std:.2f} | {statistics.mean(row['steps']):.0f} | {', '.join(f'{100 * a:.1f}' for a in acc)} |")
    best = max(report["rows"], key=lambda r: statistics.mean(r["accuracies"]))
    dm = [r for r in report["rows"] if r["objective"] == "dmssl"]
    others = [r for r in report["rows"] if r["objective"] != "dmssl"]
    if dm and others:
        best_dm = max(dm, key=lambda r: statistics.mean(r["accuracies"]))
        best_other = max(others, key=lambda r: statistics.mean(r["accuracies"]))
        verdict = "beats" if statistics.mean(best_dm["accuracies"]) > statistics.mean(best_other["accuracies"]) else "does **not** beat"
        best_name = f"{best['objective']} {best['distance'] or ''}".strip()
        lines += ["", f"Best: {best_name}. The best dmssl variant ({best_dm['distance']}) "
                  f"{verdict} the best baseline ({best_other['objective']}) here."]
    return "\n".join(lines) + "\n"


def cell_extras(parser: argparse.ArgumentParser, given: list[list[str]],
                cells: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], list[str]]:
    """--cell-extra groups as {cell: overrides}; a cell outside the grid or an override without '=' is an error.

    `OBJECTIVE:*` names every cell of that objective in the grid, and none where the grid has none of them: a
    script that passes one set of extras to grids of different cells (benchmarks/digits_shift.sh) needs that.
    """
    extras: dict[tuple[str, str | None], list[str]] = {}
    objectives = sorted({objective for objective, _ in CELLS + EXTRA_CELLS})
    for text, *overrides in given:
        bad = [o for o in overrides if "=" not in o]
        if not overrides or bad:
            parser.error(f"--cell-extra {text}: expected KEY=VALUE overrides after the cell, got {bad or 'none'}")
        if text.endswith(":*"):
            if text[:-2] not in objectives:
                parser.error(f"--cell-extra {text}: unknown objective {text[:-2]!r}; allowed: {', '.join(objectives)}")
            chosen = [cell for cell in cells if cell[0] == text[:-2]]
        else:
            try:
                cell = parse_cell(text)
            except argparse.ArgumentTypeError as error:
                parser.error(f"--cell-extra: {error}")
            if cell not in cells:
                parser.error(f"--cell-extra {text}: not a cell of this grid; its cells: " + ", ".join(map(cell_text, cells)))
            chosen = [cell]
        for cell in chosen:
            extras.setdefault(cell, []).extend(overrides)
    return extras


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modality", choices=sorted(PRESETS))
    parser.add_argument("--data", help="data.root for the modality's data set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="trainer.max_steps of every run")
    parser.add_argument("--minutes", type=float, help="trainer.max_minutes of every run")
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=CELLS, metavar="OBJECTIVE[:DISTANCE]",
                        help="the grid's rows (default: all six), e.g. sscl dmssl:mmd")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run "
                        "(a cell whose finished run has another config reruns in place: give each set of extras its own "
                        "--runs folder to keep both)")
    parser.add_argument("--cell-extra", nargs="+", action="append", default=[], metavar="CELL KEY=VALUE",
                        help="overrides for one cell only, after --extra; repeatable, e.g. --cell-extra dmssl:mmd "
                        "objective.lambda_dm=3 (an option only one objective has, such as lambda_dm, goes here); "
                        "'dmssl:*' names every dmssl cell of the grid")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at a time (default 1)")
    parser.add_argument("--write", type=Path, help="replace the quality-<modality> section of this markdown file")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}; allowed: 1 or more")
    args.cell_extra = cell_extras(parser, args.cell_extra, args.cells)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(o, d, seed): pool.submit(run_cell, args, o, d, seed) for o, d in args.cells for seed in args.seeds}
        finished = {cell: future.result() for cell, future in futures.items()}
    rows, summaries = [], []
    for objective, distance in args.cells:
        cell = [finished[(objective, distance, seed)] for seed in args.seeds]
        summaries += cell
        rows.append({"objective": objective, "distance": distance, "accuracies": [s["test_accuracy"] for s in cell],
                     "dev_accuracies": [s["dev_accuracy"] for s in cell if s.get("dev_accuracy") is not None],
                     "steps": [s["steps"] for s in cell]})
    report = {"modality": args.modality, "rows": rows, "seeds": args.seeds, "steps": args.steps, "minutes": args.minutes,
              "date": date.today().isoformat(), "machine": f"{platform.machine()} {describe_runs_machine(summaries)}",
              "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:])}
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"quality-{args.modality}.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    print(text)
    if args.write:
        write_section(args.write, f"quality-{args.modality}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
