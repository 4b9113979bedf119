"""The shift report of a recipe (labeled vs unlabeled features of the starting encoder, against shuffles),
without training: one case per call, collected in a JSON file and rendered as one table.

    python benchmarks/shift_reports.py --label "quickstart: one pool" --json runs/shift-reports.json recipe=quickstart
    python benchmarks/shift_reports.py --label "USPS -> MNIST" --json runs/shift-reports.json \
        recipe=image_digits_shift data.root=../shared/data/digits-shift/digits-usps-mnist.tar.gz
    python benchmarks/shift_reports.py --render runs/shift-reports.json --write docs/results/shift.md --section shift-reports

Each case builds exactly what `train.py` builds with the same overrides up to the first step (the splits, the
objective, the encoder from the seed, the feature cache where the encoder is frozen) and prints the line a run
prints at its start (`dmssl/shift_report.py`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.speed import publish  # noqa: E402


def measure(overrides: list[str]) -> dict:
    from accelerate import PartialState

    from dmssl.data import check_raw_data
    from dmssl.modality import build_adapter
    from dmssl.model import SSLModel
    from dmssl.objective import objective_from_config
    from dmssl.pretrained import apply_freeze
    from dmssl.recipe import resolve
    from dmssl.shift_report import shift_report
    from dmssl.trainer import cached_inputs, split_run_data

    cfg = resolve(overrides)
    process = PartialState(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    adapter = build_adapter(cfg)
    raw = adapter.load()
    check_raw_data(raw, needs_test=not cfg.data.transductive_test)
    data = split_run_data(raw, cfg)
    objective = objective_from_config(cfg, data.num_classes)  # as fit: before the encoder, for the same init
    encoder = adapter.build_encoder()
    apply_freeze(encoder, cfg.model.freeze)
    inputs, data = cached_inputs(adapter, raw, data, encoder, cfg, process)
    model = SSLModel(encoder, data.num_classes, cfg.model.proj_hidden_dim, cfg.model.proj_dim,
                     linear_head=objective.head == "linear").to(process.device)
    report = shift_report(model, inputs, data.labeled, [s for s, _ in data.pool], cfg.seed, process.device,
                          cfg.data.eval_batch_size)
    if report is None:
        raise SystemExit("error: fewer than two labeled or unlabeled samples: no shift report")
    print(report.describe(), flush=True)
    return report.record()


def render(cases: list[dict]) -> str:
    lines = ["| case | encoder | labeled / unlabeled | MMD^2 | noise floor (+- std) | z | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        r = case["report"]
        lines.append(f"| {case['label']} | {case['encoder']} | {r['num_labeled']} / {r['num_unlabeled']} | {r['mmd2']:.4g} | "
                     f"{r['noise_floor']:.2g} +- {r['noise_std']:.2g} | {r['z']:.1f} | {r['p_value']:.3f} | {r['verdict']} |")
    commands = "\n".join(f"    {case['command']}" for case in cases)
    return "\n".join(lines) + f"\n\nCommands ({cases[0]['date'] if cases else ''}):\n\n{commands}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe=... and key=value overrides, as for train.py")
    parser.add_argument("--label", help="the case's name in the table")
    parser.add_argument("--json", type=Path, help="the file that collects the cases (a case of the same label is replaced)")
    parser.add_argument("--render", type=Path, help="render this file's cases instead of measuring")
    parser.add_argument("--write", type=Path, help="replace a section of this markdown file (needs --section)")
    parser.add_argument("--section", default="shift-reports")
    args = parser.parse_args()
    if args.render:
        cases = json.loads(args.render.read_text())
    else:
        if not args.overrides or not args.label or not args.json:
            parser.error("measuring needs overrides (recipe=...), --label and --json")
        record = measure(args.overrides)
        from dmssl.recipe import resolve

        cfg = resolve(args.overrides)
        encoder = getattr(cfg.modality.options, "pretrained", None) if cfg.model.encoder in ("pretrained", "transformer") else None
        cases = json.loads(args.json.read_text()) if args.json.is_file() else []
        cases = [c for c in cases if c["label"] != args.label] + [{
            "label": args.label, "encoder": Path(encoder).name if encoder else f"{cfg.model.encoder} (random init)",
            "report": record, "date": date.today().isoformat(),
            "command": "python benchmarks/shift_reports.py " + shlex.join(sys.argv[1:])}]
        args.json.write_text(json.dumps(cases, indent=2))
    publish(render(cases), args.write, args.section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
