"""GPU evidence in one command: step speed, the loader, the distances' cost and a short CIFAR-10 quality check.

    python benchmarks/gpu_check.py --cifar PATH/cifar10-jpg.tar.gz --json gpu.json [--minutes 8] \
        [--pretrained PATH/tf_efficientnet_lite0 --fine-tune-minutes 4]
    python benchmarks/gpu_check.py --tiny            # smoke run on a CPU (CI): small sizes, about a minute
    python benchmarks/gpu_check.py --cifar PATH/cifar10-jpg.tar.gz --pretrained PATH --only-fine-tune --minutes 8 \
        --json fine-tune.json      # part 4 alone, with the whole budget
    python benchmarks/gpu_check.py --cifar PATH/cifar10-jpg.tar.gz --pretrained PATH --only-fine-tune --minutes 8 \
        --steps 1238 --set seed=1 objective.name=fixmatch --json fine-tune.json   # another seed or objective,
                                                                                   # at a fixed step budget
    python benchmarks/gpu_check.py --render gpu.json --write docs/results/gpu.md   # put a run's figures on a page

1. speed: one fixmatch and one dmssl training step at the CIFAR-10 recipe's batch (64 labeled + 7 x 64
   unlabeled in 2 or 3 views, WRN-28-2) in fp32, bf16 + channels-last, and bf16 + channels-last + compile;
   images per second and, for WRN-28-2, the fraction of the GPU's dense bf16 peak the step reaches
   (3 x 0.43 GFLOPs per image for forward + backward);
2. distances: forward + backward time and peak memory at n = 1k ... 16k embeddings per side (d = 128);
3. quality and the loader: the real trainer on CIFAR-10 with 250 labels and WRN-28-2, fixmatch then dmssl
   for the same number of steps (as many as fit the time left), each run's test accuracy and the share of
   its loop spent waiting for the DataLoader (the loader keeps up when that share is small);
4. with --pretrained (a timm folder or hub name): the full fine-tune of `recipe=image_cifar10_pretrained` on all
   of CIFAR-10 with its GPU settings (`FINE_TUNE`: the whole encoder trains, no cache, bf16), for as many steps
   as fit --fine-tune-minutes; its test accuracy, steps per second and share of the GPU's bf16 peak, from the
   encoder's training FLOPs per image as PyTorch's FlopCounterMode counts them at the model's input size.
   The number of steps is planned from a timed step before the run, so that the cosine schedule ends where the
   budget does (a run cut by trainer.max_minutes would stop with its learning rate still high); test accuracy is
   also read at each quarter of the run, a learning curve of one seed.

Everything is written to --json as it is measured, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.speed import (  # noqa: E402
    DEVICE,
    bf16_peak_tflops,
    distance_costs,
    interleaved_medians,
    sync,
    variant_steps,
    write_section,
    wrn_step_flops,
)
from dmssl.errors import ConfigError  # noqa: E402
from dmssl.modality import build_adapter  # noqa: E402
from dmssl.objective import objective_from_config  # noqa: E402
from dmssl.recipe import resolve  # noqa: E402

# The adapter by module path: this script also runs from a plain checkout, where no entry point is installed.
IMAGE = "modality.name=modalities.image:ImageModality"
# The pretrained CIFAR-10 recipe's GPU settings for a full fine-tune (its header names the same overrides).
FINE_TUNE = ["model.freeze=none", "model.cached_views=0", "modality.pretrained_size=null", "data.train_subset=null",
             "data.test_subset=null", "trainer.optimizer=adamw", "trainer.lr=0.0003", "trainer.head_lr_scale=10",
             "trainer.mixed_precision=bf16"]


def random_image_step(cfg: Any, num_views: int, channels: int, size: int) -> dict[str, Any]:
    """One step's batch of the run `cfg` as random uint8 images: the labeled batch, then `num_views` views of
    the unlabeled one (seeded, so that every timing sees the same pixels)."""
    b, u = cfg.data.batch_size, cfg.data.batch_size * cfg.data.mu
    generator = torch.Generator().manual_seed(0)
    return {"inputs": torch.randint(0, 256, (b + num_views * u, channels, size, size), dtype=torch.uint8,
                                    generator=generator),
            "labels": torch.randint(0, 10, (b,), generator=generator), "num_unlabeled": u,
            "unlabeled_targets": torch.randint(0, 10, (u,), generator=generator)}


def step_speed(tiny: bool, compile_ok: bool, repeats: int) -> list[dict[str, Any]]:
    """fixmatch and dmssl steps on random uint8 images of the recipe's batch, per precision variant."""
    base = (["recipe=quickstart", "data.batch_size=4", "data.mu=2"] if tiny
            else ["recipe=image_cifar10", "model.encoder=wrn28_2"])
    rows = []
    peak = bf16_peak_tflops(torch.cuda.get_device_name()) if DEVICE.type == "cuda" else None
    for objective_name in ("fixmatch", "dmssl"):
        variants = {"fp32": (False, True, False), "bf16+cl": (True, True, False)}
        if compile_ok and objective_name == "dmssl":  # one compile (about a minute) is enough to tell
            variants["bf16+cl+compile"] = (True, True, True)
        cfg = resolve(base + [IMAGE, f"objective.name={objective_name}"])
        adapter = build_adapter(cfg)
        views = objective_from_config(cfg, 10).unlabeled_views
        item = random_image_step(cfg, len(views), channels=3, size=8 if tiny else 32)
        images = item["inputs"].shape[0]
        fns, compile_s = variant_steps(cfg, adapter, 10, item, variants)
        medians = interleaved_medians(fns, repeats, warmup=2)
        for name, seconds in medians.items():
            row = {"objective": objective_name, "variant": name, "encoder": cfg.model.encoder, "images": images,
                   "step_s": seconds, "images_per_s": images / seconds, "speedup_over_fp32": medians["fp32"] / seconds,
                   "compile_s": compile_s.get(name)}
            if cfg.model.encoder == "wrn28_2" and peak:
                row["bf16_peak_fraction"] = wrn_step_flops(images) / seconds / (peak * 1e12)
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fns[name]()
                sync()
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print(f"speed {objective_name} {name}: {seconds * 1000:.1f} ms/step, {images / seconds:,.0f} images/s"
                  + (f", {100 * row['bf16_peak_fraction']:.1f} % of bf16 peak" if "bf16_peak_fraction" in row else ""),
                  flush=True)
    return rows


def quality(tiny: bool, cifar: str | None, seconds_left: float, step_s: float, workers: int) -> list[dict[str, Any]]:
    """fixmatch and dmssl through `train.py`, the same number of steps each, each in a fresh process."""
    if tiny:
        base = ["recipe=quickstart", "data.batch_size=8", "data.mu=2", "data.num_workers=0"]
        steps = 10
    else:
        base = ["recipe=image_cifar10", "model.encoder=wrn28_2", "data.num_labels=250", f"data.root={cifar}",
                f"data.num_workers={workers}", "data.eval_batch_size=1024"]
        overhead_s = 60.0  # start-up, the first run's decoding of the archive (about 30 s), evaluation
        steps = max(50, int((seconds_left - 2 * overhead_s) / 2 / (step_s * 1.3)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, objective_name in enumerate(("fixmatch", "dmssl")):
            share_s = max(30.0, (seconds_left - 20) / (2 - i))
            run_dir = Path(folder) / objective_name
            started = time.monotonic()
            command = [sys.executable, str(ROOT / "train.py"), *base, IMAGE, f"objective.name={objective_name}",
                       f"trainer.max_steps={steps}", f"trainer.max_minutes={max(0.2, (share_s - 45) / 60):.2f}",
                       f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}", "trainer.save_embeddings=false",
                       "trainer.progress_bar=false", f"output_dir={run_dir}"]
            try:
                done = subprocess.run(command, cwd=ROOT, timeout=share_s + 60, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                rows.append({"objective": objective_name, "error": f"no result within {share_s + 60:.0f} s"})
                continue
            finally:
                seconds_left -= time.monotonic() - started
            if done.returncode != 0:
                rows.append({"objective": objective_name, "error": done.stderr.strip().splitlines()[-1:]})
                print(f"quality {objective_name} failed:\n{done.stderr[-3000:]}", flush=True)
                continue
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            rows.append({k: summary[k] for k in ("objective", "test_accuracy", "steps", "train_seconds", "wall_seconds",
                                                 "data_wait_share", "mixed_precision", "num_labeled", "num_test",
                                                 "stop_reason")} | {"planned_steps": steps})
            print(f"quality {objective_name}: test_accuracy={summary['test_accuracy']:.4f} after {summary['steps']} "
                  f"steps, {summary['train_seconds']:.0f} s, data wait {100 * summary['data_wait_share']:.1f} %",
                  flush=True)
    return rows


def train_step_flops_per_image(overrides: list[str]) -> float:
    """FLOPs of one training step of the run's encoder per input image: 3 x its forward's, as PyTorch's
    FlopCounterMode counts the forward at the encoder's own input size (the convention wrn_step_flops uses too;
    the counter's backward formula ignores convolution groups, which would count EfficientNet's depthwise
    convolutions' backward as full ones: 32 GFLOPs an image instead of 2.3)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = resolve(overrides)
    adapter = build_adapter(cfg)
    encoder = adapter.build_encoder().to(DEVICE).eval()
    # CIFAR-sized uint8 images: the encoder resizes them to its own input size, as in the run.
    images = torch.randint(0, 256, (2, getattr(adapter, "in_channels", 3), 32, 32), dtype=torch.uint8, device=DEVICE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(images)
    return 3 * counter.get_total_flops() / images.shape[0]


def fine_tune_overrides(tiny: bool, cifar: str | None, pretrained: str, workers: int) -> list[str]:
    """The fine-tune run's recipe and overrides: the pretrained CIFAR-10 recipe with its GPU settings, or a tiny
    CPU stand-in on the bundled digits."""
    if tiny:
        return ["recipe=quickstart", "model.encoder=pretrained", f"modality.pretrained={pretrained}",
                "modality.pretrained_size=32", "model.freeze=none", "model.cached_views=0", "data.batch_size=8",
                "data.mu=2", "data.num_workers=0", "trainer.mixed_precision=no", IMAGE]
    return ["recipe=image_cifar10_pretrained", f"data.root={cifar}", f"modality.pretrained={pretrained}", *FINE_TUNE,
            f"data.num_workers={workers}", "data.eval_batch_size=1024", IMAGE]


def timed_step_seconds(base: list[str], repeats: int) -> float:
    """Median seconds of one training step of the run `base` (its objective, batch and precision) on random
    CIFAR-sized images: what the number of steps that fit a budget is planned from."""
    cfg = resolve(base)
    adapter = build_adapter(cfg)
    views = objective_from_config(cfg, 10).unlabeled_views
    item = random_image_step(cfg, len(views), channels=getattr(adapter, "in_channels", 3), size=32)
    bf16 = cfg.trainer.mixed_precision == "bf16"
    fns, _ = variant_steps(cfg, adapter, 10, item, {"run": (bf16, cfg.trainer.channels_last, False)})
    return interleaved_medians(fns, repeats, warmup=2)["run"]


# Start-up, decoding CIFAR-10 (about 30 s), the shift report's pass over the pool and four evaluations of the
# test set: the part of a fine-tune's budget that trains no step.
FINE_TUNE_OVERHEAD_S = 100.0


def planned_steps(seconds: float, step_s: float) -> int:
    """Steps that fit `seconds` after the run's overhead, with a quarter to spare for the loader and logging."""
    return max(20, int((seconds - FINE_TUNE_OVERHEAD_S) / (1.25 * step_s)))


def fine_tune(base: list[str], steps: int, seconds: float, flops_per_image: float) -> dict[str, Any]:
    """The run `base` with every encoder weight trained, for `steps` (its cosine schedule's length) or as many
    as fit `seconds`; test accuracy at each quarter of the run as its curve."""
    cfg = resolve(base)
    views = objective_from_config(cfg, 10).unlabeled_views
    images_per_step = cfg.data.batch_size * (1 + len(views) * cfg.data.mu)
    pretrained = cfg.modality.options.pretrained
    every = max(1, steps // 4)
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "fine-tune"
        command = [sys.executable, str(ROOT / "train.py"), *base, f"trainer.max_steps={steps}",
                   f"trainer.max_minutes={max(0.2, (seconds - 60) / 60):.2f}", f"trainer.eval_every={every}",
                   f"trainer.checkpoint_every={steps}", "trainer.save_embeddings=false", "trainer.progress_bar=false",
                   f"output_dir={run_dir}"]
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=seconds + 120, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {seconds + 120:.0f} s"}
        if done.returncode != 0:
            print(f"fine-tune failed:\n{done.stderr[-3000:]}", flush=True)
            return {"error": done.stderr.strip().splitlines()[-1:]}
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        curve = [{"step": m["step"], "test_accuracy": m["test_accuracy"], "mask_rate": m.get("mask_rate")}
                 for m in map(json.loads, (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())]
    step_s = summary["train_seconds"] / max(1, summary["steps"])
    row = {k: summary[k] for k in ("objective", "seed", "test_accuracy", "steps", "train_seconds", "data_wait_share",
                                   "mixed_precision", "num_labeled", "num_test", "stop_reason")}
    row |= {"pretrained": pretrained, "images_per_step": images_per_step, "step_s": step_s, "planned_steps": steps,
            "curve": curve,
            "images_per_s": images_per_step / step_s, "train_flops_per_image": flops_per_image}
    peak = bf16_peak_tflops(torch.cuda.get_device_name()) if DEVICE.type == "cuda" else None
    if peak:
        row["bf16_peak_fraction"] = flops_per_image * images_per_step / step_s / (peak * 1e12)
    print(f"fine-tune: test_accuracy={row['test_accuracy']:.4f} after {row['steps']} steps, {step_s * 1000:.0f} ms/step"
          + (f", {100 * row['bf16_peak_fraction']:.1f} % of bf16 peak" if "bf16_peak_fraction" in row else ""), flush=True)
    return row


def render(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} on **{report['device']}** ({report['torch']}, {report['cpu_count']} CPU cores; "
             f"`{report['command']}`), {report['wall_seconds']:.0f} s all told."]
    if report.get("speed"):
        lines += ["", "**Step speed** (random 32x32 images, the recipe's batch; median of repeats after warm-up):", "",
                  "| objective | variant | images | step (ms) | images/s | vs fp32 | % of bf16 peak | peak memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["speed"]:
            fraction = f"{100 * r['bf16_peak_fraction']:.1f} %" if r.get("bf16_peak_fraction") is not None else "-"
            memory = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "-"
            compiled = f" (compile {r['compile_s']:.0f} s)" if r.get("compile_s") else ""
            lines.append(f"| {r['objective']} | {r['variant']}{compiled} | {r['images']} | {1000 * r['step_s']:.1f} | "
                         f"{r['images_per_s']:,.0f} | {r['speedup_over_fp32']:.2f}x | {fraction} | {memory} |")
    if report.get("distances"):
        sizes = sorted({r["n"] for r in report["distances"]})
        lines += ["", "**Distances**, forward + backward at n embeddings per side (d = 128): milliseconds "
                  "(peak memory), and as a share of the bf16 dmssl step:", "",
                  "| distance | " + " | ".join(f"n={n:,}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name in dict.fromkeys(r["distance"] for r in report["distances"]):
            cells = []
            for n in sizes:
                match = [r for r in report["distances"] if r["distance"] == name and r["n"] == n]
                if not match or match[0]["seconds"] is None:
                    cells.append("out of memory" if match else "-")
                    continue
                cells.append(f"{1000 * match[0]['seconds']:.1f} ({match[0]['peak_bytes'] / 2**20:,.0f} MiB; "
                             f"{match[0]['fraction_of_encoder_fb']:.2f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("quality"):
        lines += ["", "**Quality and the loader** (the trainer itself, one seed; data wait = share of the loop spent "
                  "waiting for the DataLoader):", "",
                  "| objective | labels | steps | test accuracy | train (s) | data wait | precision |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["quality"]:
            if "error" in r:
                lines.append(f"| {r['objective']} | - | - | failed: {r['error']} | - | - | - |")
                continue
            lines.append(f"| {r['objective']} | {r['num_labeled']} | {r['steps']} | {r['test_accuracy']:.4f} | "
                         f"{r['train_seconds']:.0f} | {100 * r['data_wait_share']:.1f} % | {r['mixed_precision']} |")
    if report.get("fine_tune"):
        r = report["fine_tune"]
        lines += ["", "**Fine-tuning the pretrained encoder** (`recipe=image_cifar10_pretrained` with its GPU settings: "
                  "every weight trains, all of CIFAR-10, as many steps as fit; one seed):", ""]
        if "error" in r:
            lines.append(f"failed: {r['error']}")
        else:
            fraction = f"{100 * r['bf16_peak_fraction']:.1f} %" if r.get("bf16_peak_fraction") is not None else "-"
            # Reports from before the seed was recorded could not set one: they ran at the config's default, 0.
            lines += ["| encoder | objective | seed | labels | steps | test accuracy | step (ms) | images/s | "
                      "train GFLOPs per image | % of bf16 peak | data wait | precision |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|",
                      f"| {Path(r['pretrained']).name} | {r['objective']} | {r.get('seed', 0)} | {r['num_labeled']} | "
                      f"{r['steps']} | {r['test_accuracy']:.4f} | {1000 * r['step_s']:.0f} | {r['images_per_s']:,.0f} | "
                      f"{r['train_flops_per_image'] / 1e9:.2f} | {fraction} | {100 * r['data_wait_share']:.1f} % | "
                      f"{r['mixed_precision']} |"]
            if r.get("curve"):
                lines += ["", "Test accuracy along the run (EMA model; pseudo-label mask rate of the steps before): "
                          + ", ".join(f"step {c['step']}: {c['test_accuracy']:.4f}"
                                      + (f" ({c['mask_rate']:.2f})" if c.get("mask_rate") is not None else "")
                                      for c in r["curve"]) + "."]
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def parts_1_to_3(report: dict[str, Any], args: argparse.Namespace, budget: float, started: float, workers: int,
                 save: Callable[[], None]) -> None:
    """Step speed, the distances' cost, and the from-scratch quality check, within `budget` seconds of `started`."""
    # Compiling on a CPU costs minutes of a smoke run's budget and needs a C++ compiler: GPU runs only.
    compile_ok = DEVICE.type == "cuda"
    if not compile_ok:
        report["notes"].append("torch.compile was not measured: it is timed on a GPU only in this script.")
    report["speed"] = step_speed(args.tiny, compile_ok, repeats=3 if args.tiny else 20)
    save()
    dmssl_bf16 = next(r for r in report["speed"] if r["objective"] == "dmssl" and r["variant"] == "bf16+cl")
    sizes = [64, 128] if args.tiny else [1024, 2048, 4096, 8192, 16384]
    report["distances"] = distance_costs(sizes, [128], 3 if args.tiny else 5, dmssl_bf16["step_s"])
    for row in report["distances"]:
        print(f"distance {row['distance']} n={row['n']}: {1000 * row['seconds']:.1f} ms, "
              f"{row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    save()
    seconds_left = budget - (time.monotonic() - started)
    report["quality"] = quality(args.tiny, args.cifar, seconds_left, dmssl_bf16["step_s"], workers)
    save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes and the bundled digits: a CPU smoke run")
    parser.add_argument("--cifar", help="CIFAR-10 image-folder archive (cifar10-jpg.tar.gz) for the quality check")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole run's budget (default 8)")
    parser.add_argument("--pretrained", help="a timm model (folder or hub name): also fine-tune the pretrained "
                        "CIFAR-10 recipe (part 4)")
    parser.add_argument("--fine-tune-minutes", type=float, default=4.0,
                        help="part 4's share of --minutes (default 4; the other parts share the rest)")
    parser.add_argument("--only-fine-tune", action="store_true",
                        help="with --pretrained: run part 4 alone, with all of --minutes (parts 1-3 measured before)")
    parser.add_argument("--steps", type=int, help="part 4: train this many steps instead of the number planned "
                        "from a timed step (the same budget for every seed and objective compared)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="part 4: overrides of the fine-tune run, e.g. seed=1 objective.name=fixmatch")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each part)")
    parser.add_argument("--render", type=Path, help="only render this JSON report as markdown")
    parser.add_argument("--write", type=Path, help="replace a section of this markdown file")
    parser.add_argument("--section", default="gpu-check",
                        help="the markers of that section (default gpu-check: <!-- gpu-check:start --> ...)")
    args = parser.parse_args()
    if args.render:
        text = render(json.loads(args.render.read_text(encoding="utf-8")))
        print(text)
        if args.write:
            write_section(args.write, args.section, text)
        return 0
    if not args.tiny and not args.cifar:
        parser.error("--cifar PATH is needed for the quality check (or pass --tiny)")
    if (args.only_fine_tune or args.steps or args.set) and not args.pretrained:
        parser.error("--only-fine-tune, --steps and --set need --pretrained PATH (the model to fine-tune)")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive number of steps, not {args.steps}")
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    if args.pretrained:  # a model that cannot be loaded stops the check here, before any part runs
        tuned = fine_tune_overrides(args.tiny, args.cifar, args.pretrained, workers) + args.set
        try:
            tuned_flops = train_step_flops_per_image(tuned)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    started = time.monotonic()
    budget = args.minutes * 60
    on_cuda = DEVICE.type == "cuda"
    report: dict[str, Any] = {
        "date": date.today().isoformat(), "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if on_cuda else "CPU", "torch": f"torch {torch.__version__}",
        "cpu_count": os.cpu_count(), "tiny": args.tiny, "notes": []}

    def save() -> None:
        report["wall_seconds"] = time.monotonic() - started
        if args.json:
            args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")

    if not args.only_fine_tune:
        parts_1_to_3(report, args, budget - (60 * args.fine_tune_minutes if args.pretrained else 0.0),
                     started, workers, save)
    if args.pretrained:
        step_s = timed_step_seconds(tuned, repeats=2 if args.tiny else 5)
        seconds = budget - (time.monotonic() - started)
        steps = args.steps or (10 if args.tiny else planned_steps(seconds, step_s))
        print(f"fine-tune: a step takes {1000 * step_s:.0f} ms (timed); {steps} steps "
              f"{'set' if args.steps else 'planned'} for {seconds:.0f} s", flush=True)
        report["fine_tune"] = fine_tune(tuned, steps, seconds, tuned_flops) | {"timed_step_s": step_s}
        save()
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
