"""How much the matching term moves the encoder: its gradient against the rest of the loss, in a dmssl run.

    python benchmarks/matching_gradient.py runs/qs-dmssl [--batches 8] [--json out.json] [--write docs/results/matching-strength.md]
    python benchmarks/matching_gradient.py --from-json out.json --write docs/results/matching-strength.md   # render a saved report

For the untrained model (the run's seed) and for every checkpoint of the run, on the run's own training
steps that follow it: the distance D, the weight it enters the loss with (lambda_dm times the ramp), and
the gradient norms on the encoder's parameters of lambda * D and of everything else (the contrastive loss
and the labeled cross-entropy), their ratio and the cosine between the two gradients. A ratio of 0.01
means the matching term is 1 % of the push the encoder gets: dmssl is then sscl in all but name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.speed import write_section  # noqa: E402
from dmssl.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from dmssl.classifier import read_run_config  # noqa: E402
from dmssl.data import StepDataset, check_raw_data  # noqa: E402
from dmssl.errors import ConfigError  # noqa: E402
from dmssl.modality import build_adapter  # noqa: E402
from dmssl.model import SSLModel  # noqa: E402
from dmssl.objective import DistributionMatching, embed_step, objective_from_config  # noqa: E402
from dmssl.train_state import TrainState  # noqa: E402
from dmssl.trainer import EMA, build_optimizer, split_run_data  # noqa: E402


def flat_norm(grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))


def cosine(a: tuple[torch.Tensor | None, ...], b: tuple[torch.Tensor | None, ...]) -> float:
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b) if x is not None and y is not None)
    return float(dot / (flat_norm(a) * flat_norm(b)).clamp_min(1e-30))


def measure_step(model: SSLModel, objective: DistributionMatching, batch: dict[str, Any], step: int) -> dict[str, float]:
    """The two gradients at one training step, on the encoder's parameters (the head has no matching gradient)."""
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    emb = embed_step(model, objective, batch, model.prototypes)
    rest, pseudo, mask, _ = objective.contrastive(emb)
    distance = objective.match(emb, pseudo, mask, step)
    weight = objective.matching_weight(step)
    g_rest = torch.autograd.grad(rest, params, retain_graph=True, allow_unused=True)
    # The gradient of D itself: at a zero weight (the start of a ramp) its direction still says what it would do.
    g_dm = torch.autograd.grad(distance, params, allow_unused=True)
    norm_rest, norm_dm = float(flat_norm(g_rest)), float(flat_norm(g_dm))
    return {"distance": float(distance.detach()), "weight": weight, "grad_rest": norm_rest, "grad_dm": weight * norm_dm,
            "ratio": weight * norm_dm / max(norm_rest, 1e-30), "cosine": cosine(g_rest, g_dm),
            "mask_rate": float(mask.float().mean())}


def measure_run(run_dir: Path, batches: int) -> list[dict[str, Any]]:
    cfg = read_run_config(run_dir)
    if cfg.objective.name != "dmssl":
        raise ConfigError(f"{run_dir} ran objective {cfg.objective.name!r}; the matching gradient exists only for 'dmssl'")
    adapter = build_adapter(cfg)
    raw = adapter.load()
    check_raw_data(raw, needs_test=not cfg.data.transductive_test)
    data = split_run_data(raw, cfg)
    torch.manual_seed(cfg.seed)
    objective = objective_from_config(cfg, data.num_classes)
    model = SSLModel(adapter.build_encoder(), data.num_classes, cfg.model.proj_hidden_dim, cfg.model.proj_dim)
    state = TrainState(model, EMA(model, cfg.trainer.ema_decay), build_optimizer(model, cfg.trainer), objective,
                       data.labeled_indices)
    steps = StepDataset(adapter, data.labeled, data.labeled_labels, [s for s, _ in data.pool], [y for _, y in data.pool],
                        cfg.data.batch_size, cfg.data.mu, objective.unlabeled_views, cfg.trainer.max_steps + batches,
                        cfg.seed)
    points = []
    for checkpoint in [None, *list_checkpoints(run_dir / "checkpoints")]:
        if checkpoint is not None:
            state.load_state_dict(load_checkpoint(checkpoint), source=str(checkpoint))
        model.train()
        rows = [measure_step(model, objective, steps[s], s) for s in range(state.step, state.step + batches)]
        point = {"step": state.step, **{k: statistics.median(r[k] for r in rows) for k in rows[0]}}
        points.append(point)
        print(f"step {point['step']:>6}: D {point['distance']:+.5f} x weight {point['weight']:.2f}; "
              f"|grad lambda*D| / |grad rest| = {point['ratio']:.4f} (cosine {point['cosine']:+.3f}; "
              f"mask rate {point['mask_rate']:.2f})", flush=True)
    return points


def markdown(report: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| run | step | D | weight | gradient norm: lambda * D | the rest | ratio | cosine | mask rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, points in report.items():
        for p in points:
            lines.append(f"| `{run}` | {p['step']} | {p['distance']:+.4f} | {p['weight']:.2f} | {p['grad_dm']:.4f} | "
                         f"{p['grad_rest']:.3f} | **{p['ratio']:.3f}** | {p['cosine']:+.3f} | {p['mask_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="*", help="finished (or checkpointed) dmssl run folders")
    parser.add_argument("--batches", type=int, default=8, help="training steps measured per point (medians)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--from-json", type=Path, help="render an earlier --json report instead of measuring")
    parser.add_argument("--write", type=Path, help="put the table into the `matching-gradient` section of this markdown file")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        print(markdown(report))
        if args.write:
            write_section(args.write, "matching-gradient", markdown(report))
        return
    if not args.run_dirs:
        parser.error("name at least one run folder (or --from-json REPORT)")
    report = {}
    for run_dir in args.run_dirs:
        print(run_dir)
        report[str(run_dir)] = measure_run(run_dir, args.batches)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    if args.write:
        write_section(args.write, "matching-gradient", markdown(report))


if __name__ == "__main__":
    main()
