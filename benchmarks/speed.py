"""Speed benchmark: where a training step's time goes, as ratios measured in one run.

    python benchmarks/speed.py [--quick] [--cifar PATH] [--fsdd PATH] [--imdb PATH] [--write docs/results/speed.md]

(a) step time of each objective on the same batch and encoder, relative to a plain forward+backward of
    the encoder on the same inputs (the SSL overhead), and the matching term's share of a dmssl step;
(b) each distance's time (forward+backward) and peak memory for n = 64 ... 4096 embeddings per side,
    as a fraction of one encoder forward+backward on a labeled batch;
(c) data loading: the time one worker (one thread, as in a DataLoader worker) needs to build a
    training step (views + collate) vs the time the training step takes, per adapter on its real data
    (when the paths are given);
(d) one real step of each recipe in each precision/layout/compile variant;
(f) the frozen-feature cache, per pretrained recipe given (`--fsdd` with `--whisper`, `--cifar` with `--timm`,
    `--imdb` on the text recipe's MiniLM):
    caching throughput (views/s: the frozen encoder in eval mode, no gradients, on a batch of test views) and
    a cached training step (the recipe's objective on cached features) as a ratio to a full forward+backward
    of the encoder (`model.freeze=none`) on the same step;
(p) the quickstart's default run (`trainer.mixed_precision=auto`, which measures) against the same run in
    fp32 (`=no`), whole runs as a user starts them, rounds interleaved; with the CPU's bf16 flags and what
    auto chose. `--sections p --write docs/results/speed.md` fills the section of this CPU's kind.

Timings: median of repeated runs after warm-up, on whatever device is present (CUDA synchronised).
Inputs for (a) and (b) are random tensors of the right shapes (timing does not depend on content).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmssl.data import StepDataset  # noqa: E402
from dmssl.distances import build_distance  # noqa: E402
from dmssl.modality import build_adapter  # noqa: E402
from dmssl.model import SSLModel  # noqa: E402
from dmssl.objective import objective_from_config, run_objective  # noqa: E402
from dmssl.recipe import resolve  # noqa: E402
from dmssl.trainer import build_optimizer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated while `fn` runs: CUDA's counter, or the CPU profiler's allocation trace."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.cpu_memory_usage
        peak = max(peak, running)
    return peak


# ---------------------------------------------------------------- (a) objectives


def image_batch(recipe: list[str], views: int) -> tuple[Any, Any, torch.Tensor]:
    cfg = resolve(recipe)
    adapter = build_adapter(cfg)
    adapter.in_channels = 3
    b, u = cfg.data.batch_size, cfg.data.batch_size * cfg.data.mu
    images = torch.randint(0, 256, (b + views * u, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    return cfg, adapter, images


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median time of each function, measured round-robin so that background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def objective_steps(recipe: list[str], repeats: int) -> dict[str, Any]:
    """Time of one optimisation step per objective vs a plain encoder forward+backward on the same images."""
    cfg, adapter, _ = image_batch(recipe, 3)
    b, u = cfg.data.batch_size, cfg.data.batch_size * cfg.data.mu
    torch.manual_seed(0)
    model = SSLModel(adapter.build_encoder(), 10, linear_head=True).to(DEVICE)  # fixmatch's head; others ignore it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, 10, (b,), device=DEVICE)
    results: dict[str, Any] = {"recipe": " ".join(recipe), "labeled": b, "unlabeled": u, "encoder": cfg.model.encoder}
    fns: dict[str, Callable[[], Any]] = {}
    sizes: dict[str, int] = {}
    for name in ("supervised", "fixmatch", "sscl", "dmssl"):
        objective = objective_from_config(resolve(recipe + [f"objective.name={name}"]), 10)
        views = objective.unlabeled_views
        images = torch.randint(0, 256, (b + len(views) * u, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
        batch = {"inputs": images, "labels": labels, "num_unlabeled": u if views else 0,
                 "unlabeled_targets": torch.randint(0, 10, (u,), device=DEVICE)}
        sizes[name] = images.shape[0]

        def step(objective: Any = objective, batch: dict = batch) -> None:
            out = run_objective(model, objective, batch, 0, model.prototypes)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()

        def plain(images: torch.Tensor = images) -> None:
            model.encoder(images).float().pow(2).mean().backward()
            optimizer.zero_grad()

        fns[name], fns[f"{name}/plain"] = step, plain
    # The matching term's own cost: the distance alone on this step's embeddings.
    distance = build_distance(cfg.distance.name, cfg.distance.options)
    x = torch.nn.functional.normalize(torch.randn(b, cfg.model.proj_dim, device=DEVICE), dim=1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(u, cfg.model.proj_dim, device=DEVICE), dim=1).requires_grad_()
    fns["matching"] = lambda: distance(x, y).backward()
    medians = interleaved_medians(fns, repeats)
    for name in ("supervised", "fixmatch", "sscl", "dmssl"):
        results[name] = {"step_s": medians[name], "images": sizes[name], "plain_forward_backward_s": medians[f"{name}/plain"],
                         "overhead": medians[name] / medians[f"{name}/plain"]}
    results["matching_share_of_dmssl_step"] = medians["matching"] / medians["dmssl"]
    results["dmssl_over_sscl"] = medians["dmssl"] / medians["sscl"]
    return results


# ---------------------------------------------------------------- (b) distances


def distance_costs(sizes: list[int], widths: list[int], repeats: int, encoder_fb_s: float) -> list[dict[str, Any]]:
    rows = []
    specs = [("cosine", {}), ("mmd", {"kernel": "gaussian", "median_scales": [0.5, 1.0, 2.0]}),
             ("wasserstein", {"method": "sliced", "num_projections": 128}),
             ("wasserstein", {"method": "sinkhorn", "epsilon": 0.05, "iterations": 100})]
    for d in widths:
        for n in sizes:
            x = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).requires_grad_()
            y = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).requires_grad_()
            for name, options in specs:
                if options.get("method") == "sinkhorn" and n > 1024 and DEVICE.type == "cpu":
                    continue  # O(iterations n^2): minutes on a CPU at these sizes
                distance = build_distance(name, **options)

                def run(distance: Any = distance, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                    distance(x, y).backward()

                label = name if name != "wasserstein" else f"wasserstein-{options['method']}"
                try:
                    t = median_time(run, repeats, warmup=1)
                    rows.append({"distance": label, "n": n, "d": d, "seconds": t, "peak_bytes": peak_memory(run),
                                 "fraction_of_encoder_fb": t / encoder_fb_s})
                except torch.OutOfMemoryError:  # a row that says so, not a lost report
                    if DEVICE.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append({"distance": label, "n": n, "d": d, "seconds": None, "peak_bytes": None,
                                 "fraction_of_encoder_fb": None})
    return rows


# ---------------------------------------------------------------- (c) loading, (d) precision


def recipe_step(recipe: list[str]) -> tuple[Any, Any, Any, StepDataset, tuple[str, ...]]:
    """(cfg, adapter, raw data, steps, views) of a recipe on its real data: what (c) and (d) time."""
    cfg = resolve(recipe)
    adapter = build_adapter(cfg)
    raw = adapter.load()
    views = ("weak", "strong", "strong")
    labeled = list(range(min(len(raw.train), 100)))
    steps = StepDataset(adapter, [raw.train[i] for i in labeled], [max(0, raw.train_labels[i]) for i in labeled],
                        raw.train, [max(-1, y) for y in raw.train_labels], cfg.data.batch_size, cfg.data.mu, views,
                        10_000, 0)
    return cfg, adapter, raw, steps, views


def training_step(cfg: Any, adapter: Any, num_classes: int, item: dict[str, Any], bf16: bool = False,
                  channels_last: bool = False, compile: bool = False, freeze: int | str = "none") -> Callable[[], None]:
    """One optimisation step of the recipe's objective on `item`, as the trainer runs it (fresh seeded model,
    its encoder frozen as `model.freeze=freeze` says)."""
    from accelerate.utils import send_to_device

    from dmssl.pretrained import apply_freeze

    torch.manual_seed(0)
    objective = objective_from_config(cfg, num_classes)
    encoder = adapter.build_encoder()
    apply_freeze(encoder, freeze)
    model = SSLModel(encoder, num_classes, cfg.model.proj_hidden_dim, cfg.model.proj_dim,
                     linear_head=objective.head == "linear").to(DEVICE)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.encoder.compile()
    optimizer = build_optimizer(model, cfg.trainer)
    item = send_to_device(item, DEVICE)

    def forward(inputs: Any, **kwargs: Any) -> Any:  # autocast around the model only, as Accelerate wraps it
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            return model(inputs, **kwargs)

    def step() -> None:
        out = run_objective(forward, objective, item, 0, model.prototypes)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def loader_vs_step(recipe: list[str], repeats: int) -> dict[str, Any]:
    """Seconds for one worker to build a step vs seconds for the step itself, on real data."""
    cfg, adapter, raw, steps, views = recipe_step(recipe)
    counter = iter(range(10_000))
    # DataLoader workers run with one intra-op thread; timing the build with the main process's threads
    # would add thread overhead on tiny per-sample tensors that a worker never pays.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_build = median_time(lambda: steps[next(counter)], repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)
    step = training_step(cfg, adapter, raw.num_classes, steps[0], channels_last=cfg.trainer.channels_last)
    t_step = median_time(step, max(3, repeats // 2), warmup=1)
    samples = min(len(raw.train), 100, cfg.data.batch_size) + len(views) * cfg.data.batch_size * cfg.data.mu
    return {"recipe": " ".join(recipe[:1]), "samples_per_step": samples,
            "build_s": t_build, "step_s": t_step, "build_over_step": t_build / t_step,
            "workers_needed": t_build / t_step, "default_workers": cfg.data.num_workers}


# (bf16, channels_last, compile) of each measured variant; the first is the reference.
PRECISION_VARIANTS = {
    "fp32": (False, False, False),
    "fp32+cl": (False, True, False),
    "fp32+cl+compile": (False, True, True),
    "bf16+cl": (True, True, False),
    "bf16+cl+compile": (True, True, True),
}


def variant_steps(cfg: Any, adapter: Any, num_classes: int, item: dict[str, Any],
                  variants: dict[str, tuple[bool, bool, bool]]) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """One training step per (bf16, channels_last, compile) variant, and the compile time of the compiled ones."""
    fns: dict[str, Callable[[], None]] = {}
    compile_seconds: dict[str, float] = {}
    for name, (bf16, channels_last, compiled) in variants.items():
        fns[name] = training_step(cfg, adapter, num_classes, item, bf16, channels_last, compiled)
        if compiled:  # the first calls compile (forward, then backward); timed apart from the steps
            start = time.perf_counter()
            fns[name]()
            fns[name]()
            sync()
            compile_seconds[name] = time.perf_counter() - start
    return fns, compile_seconds


def step_units(item: dict[str, Any], cfg: Any) -> tuple[float, str]:
    """What a step processes, in the modality's natural unit: tokens, seconds of audio, or samples."""
    inputs = item["inputs"]
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return float(inputs["attention_mask"].sum()), "tokens"
    rate = getattr(cfg.modality.options, "sample_rate", None)
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 2 and rate:
        return inputs.numel() / rate, "audio seconds"
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return float(inputs.shape[0]), "images"
    return float(item["labels"].shape[0]), "samples"


def precision_variants(recipe: list[str], repeats: int, variants: list[str]) -> dict[str, Any]:
    """Step time of the recipe's training step in each precision/layout/compile variant, measured round-robin."""
    cfg, adapter, raw, steps, views = recipe_step(recipe)
    item = steps[0]
    units, unit = step_units(item, cfg)
    fns, compile_seconds = variant_steps(cfg, adapter, raw.num_classes, item,
                                         {name: PRECISION_VARIANTS[name] for name in variants})
    medians = interleaved_medians(fns, repeats, warmup=1)
    reference = medians[variants[0]]
    shown = " ".join(token for token in recipe if not token.startswith("data.root="))
    return {"recipe": shown, "encoder": cfg.model.encoder, "unit": unit, "units_per_step": units,
            "variants": {name: {"step_s": t, "speedup": reference / t, "units_per_s": units / t,
                                "compile_s": compile_seconds.get(name)} for name, t in medians.items()}}


# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "RTX 4090": 165.2}
WRN28_2_FORWARD_GFLOPS = 0.43  # per 32x32 image, counted layer by layer (forward + backward is about 3x)


def bf16_peak_tflops(device_name: str) -> float | None:
    for fragment, peak in BF16_PEAK_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


def wrn_step_flops(images: int) -> float:
    """FLOPs of a WRN-28-2 training step (forward + backward) over `images` 32x32 images."""
    return 3 * WRN28_2_FORWARD_GFLOPS * 1e9 * images


# ---------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} (`{report['command']}`); medians after warm-up.", ""]
    a = report["objectives"]
    lines += [f"**(a) Step time per objective** ({a['encoder']}, {a['labeled']} labeled + {a['unlabeled']} unlabeled "
              "per step, random 32x32 images). *overhead* = step time / a plain encoder forward+backward on the same images.", "",
              "| objective | images per step | step (s) | plain fwd+bwd (s) | overhead |", "|---|---|---|---|---|"]
    for name in ("supervised", "fixmatch", "sscl", "dmssl"):
        r = a[name]
        lines.append(f"| {name} | {r['images']} | {r['step_s']:.3f} | {r['plain_forward_backward_s']:.3f} | {r['overhead']:.3f} |")
    lines += ["", f"The matching term alone (distance forward+backward on the step's {a['labeled']} + {a['unlabeled']} embeddings) "
              f"is **{100 * a['matching_share_of_dmssl_step']:.2f} %** of a dmssl step; dmssl / sscl step time = "
              f"{a['dmssl_over_sscl']:.3f}.", ""]
    lines += ["**(b) Distances**: forward+backward time and peak memory, n embeddings per side, as a fraction of one "
              f"encoder forward+backward on {a['labeled']} labeled images ({report['encoder_fb_s']:.4f} s).", "",
              "| distance | d | " + " | ".join(f"n={n}" for n in report["sizes"]) + " |",
              "|---|---|" + "---|" * len(report["sizes"])]
    for d in report["widths"]:
        for name in dict.fromkeys(r["distance"] for r in report["distances"]):
            cells = []
            for n in report["sizes"]:
                match = [r for r in report["distances"] if r["distance"] == name and r["n"] == n and r["d"] == d]
                cells.append(f"{match[0]['fraction_of_encoder_fb']:.3f} ({match[0]['peak_bytes'] / 2**20:.1f} MiB)"
                             if match and match[0]["seconds"] is not None else "out of memory" if match else "-")
            lines.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "**(c) Data loading vs training step** (one worker, one thread, building a whole step: views + collate, real data). "
              "*workers needed* = build time / step time: the loader keeps up when `data.num_workers` is at least that.", "",
              "| recipe | samples per step | build (s) | step (s) | workers needed | default workers |", "|---|---|---|---|---|---|"]
    for r in report["loading"]:
        lines.append(f"| {r['recipe']} | {r['samples_per_step']} | {r['build_s']:.3f} | {r['step_s']:.3f} | "
                     f"{r['workers_needed']:.2f} | {r['default_workers']} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path`."""
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + body + end + rest.split(end, 1)[1], encoding="utf-8")


def publish(text: str, path: Path | None, section: str) -> None:
    """Print a rendered table and, with a path, put it between the section's markers there."""
    print(text)
    if path:
        write_section(path, section, text)


def _short(recipe: str) -> str:
    return " ".join(t for t in recipe.split() if not t.startswith("data.root="))


def precision_markdown(report: dict[str, Any]) -> str:
    names = report["variants"]
    lines = [f"Measured {report['date']} on {report['machine']} (`{report['command']}`); medians of round-robin "
             "repeats after warm-up, each variant a fresh model with the same seed, on one real step of the recipe "
             "(its batch, its objective with weak + 2 strong views). *speedup* = fp32 step time / the variant's; "
             "cl = channels-last; compile = `torch.compile` of the encoder (its compile time apart).", "",
             "| recipe | encoder | " + " | ".join(names) + " | throughput of the fastest |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for row in report["precision"]:
        cells = [f"{row['variants'][n]['step_s']:.3f} s ({row['variants'][n]['speedup']:.2f}x)" if n in row["variants"]
                 else "-" for n in names]
        fastest = max(row["variants"], key=lambda n: row["variants"][n]["speedup"])
        lines.append(f"| {_short(row['recipe'])} | {row['encoder']} | " + " | ".join(cells)
                     + f" | {row['variants'][fastest]['units_per_s']:,.0f} {row['unit']}/s ({fastest}) |")
    compiled = [(_short(row["recipe"]), n, v["compile_s"]) for row in report["precision"] for n, v in row["variants"].items()
                if v["compile_s"]]
    if compiled:
        lines += ["", "Compile time (first forward + backward): " + "; ".join(
            f"{recipe} {name}: {seconds:.0f} s" for recipe, name, seconds in compiled) + "."]
    return "\n".join(lines) + "\n"


def cache_costs(recipe: list[str], repeats: int) -> dict[str, Any]:
    """Caching throughput and a cached step against a full fine-tuning step, on one real step of `recipe`."""
    from accelerate.utils import send_to_device

    from dmssl.model import CachedInputs
    from dmssl.pretrained import freeze_units

    cfg, adapter, raw, steps, _ = recipe_step(recipe)
    item = steps[0]
    torch.manual_seed(0)
    encoder = adapter.build_encoder().to(DEVICE).eval()
    # A transductive recipe's raw data has no test set (its test is cut from the pool): clean views of train samples.
    clean = list((raw.test if len(raw.test) else raw.train)[: cfg.data.eval_batch_size])
    views = send_to_device(adapter.collate([adapter.test_view(s) for s in clean]), DEVICE)
    with torch.no_grad():
        encode_s = median_time(lambda: encoder(views), repeats, warmup=1)
        features = encoder(send_to_device(item["inputs"], DEVICE)).float().cpu()
    cached_item = dict(item, inputs=CachedInputs(features=features))
    timed = {"full": training_step(cfg, adapter, raw.num_classes, item),
             "cached": training_step(cfg, adapter, raw.num_classes, cached_item)}
    # A frozen prefix, where the encoder can start after one: all but its top two blocks frozen and cached.
    units = freeze_units(encoder) or []
    prefix = len(units) - 2 if len(units) > 2 and getattr(encoder, "can_start_from", lambda n: False)(len(units) - 2) else 0
    if prefix:
        with torch.no_grad():
            hidden = encoder.encode_prefix(send_to_device(item["inputs"], DEVICE), prefix).float().cpu()
        prefix_item = dict(item, inputs=CachedInputs(hidden=hidden, prefix_blocks=prefix))
        timed["prefix"] = training_step(cfg, adapter, raw.num_classes, prefix_item, freeze=prefix)
    medians = interleaved_medians(timed, repeats, warmup=1)
    in_order = encode_orders(adapter, encoder, list(raw.train[: 4 * cfg.data.eval_batch_size]), cfg.data.eval_batch_size,
                             repeats)
    shown = " ".join(t for t in recipe if not t.startswith(("data.root=", "modality.pretrained=", "modality.train_files=")))
    return {"recipe": shown, "encoder": type(encoder).__name__, "views_per_encode": len(clean),
            "encode_views_per_s": len(clean) / encode_s,
            "step_samples": int(features.shape[0]), "full_step_s": medians["full"], "cached_step_s": medians["cached"],
            "full_over_cached": medians["full"] / medians["cached"],
            "prefix_blocks": prefix, "of_blocks": len(units), "prefix_step_s": medians.get("prefix")} | in_order


def encode_orders(adapter: Any, encoder: Any, samples: list[Any], batch_size: int, repeats: int) -> dict[str, Any]:
    """Caching throughput of `samples` in batches, in the data's order and in the cache's length order, timed in
    turn; empty where views are not token sequences (the cache then keeps the data's order)."""
    from accelerate.utils import send_to_device

    from dmssl.feature_cache import length_order

    if not samples or not isinstance(adapter.test_view(samples[0]), (list, tuple)):
        return {}
    views = [adapter.test_view(s) for s in samples]
    batches = {name: [send_to_device(adapter.collate([views[i] for i in order[start: start + batch_size]]), DEVICE)
                      for start in range(0, len(order), batch_size)]
               for name, order in (("data", list(range(len(views)))), ("length", list(length_order(adapter, samples))))}

    def encode_all(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for batch in batches[name]:
                    encoder(batch)
        return run

    medians = interleaved_medians({name: encode_all(name) for name in batches}, max(2, repeats // 2), warmup=1)
    return {"order_samples": len(views), "data_order_views_per_s": len(views) / medians["data"],
            "length_order_views_per_s": len(views) / medians["length"]}


def cache_markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} (`{report['command']}`); medians after warm-up, one real "
             "step of each recipe. *caching* = views/s of the frozen encoder (eval mode, no gradients); *full step* = "
             "the recipe's objective with the encoder trained (`model.freeze=none`); *cached step* = the same objective on "
             "cached features (`model.freeze=all`); *cached prefix step* = the top two blocks trained on the cached "
             "outputs of the frozen ones below (`model.freeze=N`), where the encoder can start after a prefix.", "",
             "| recipe | encoder | caching (views/s) | samples per step | full step (s) | cached step (s) | full / cached "
             "| cached prefix step (s) | full / prefix |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["cache"]:
        prefix = (f"{r['prefix_step_s']:.3f} (freeze={r['prefix_blocks']} of {r['of_blocks']}) | "
                  f"**{r['full_step_s'] / r['prefix_step_s']:.1f}x**" if r.get("prefix_step_s") else "- | -")
        lines.append(f"| {r['recipe']} | {r['encoder']} | {r['encode_views_per_s']:.1f} | {r['step_samples']} | "
                     f"{r['full_step_s']:.3f} | {r['cached_step_s']:.4f} | **{r['full_over_cached']:.0f}x** | {prefix} |")
    ordered = [r for r in report["cache"] if r.get("length_order_views_per_s")]
    if ordered:
        lines += ["", "*Caching in length order* (token sequences only): the first training samples encoded in batches of "
                  "the recipe's evaluation size, in the data's order and in the cache's order (by length: a batch pads to "
                  "its longest member), timed in turn:", "",
                  "| recipe | samples | data order (views/s) | length order (views/s) | length / data |", "|---|---|---|---|---|"]
        for r in ordered:
            lines.append(f"| {r['recipe']} | {r['order_samples']} | {r['data_order_views_per_s']:.1f} | "
                         f"{r['length_order_views_per_s']:.1f} | **{r['length_order_views_per_s'] / r['data_order_views_per_s']:.2f}x** |")
    return "\n".join(lines) + "\n"


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and native bf16 instruction sets (what auto's candidates depend on)."""
    from dmssl.precision import cpu_bf16_instructions

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_bf16_instructions()
    return {"model": name, "bf16_flags": flags, "kind": "amx" if "amx_bf16" in flags else
            "avx512_bf16" if flags else "no native bf16"}


def auto_versus_fp32(steps: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    """Wall time of the quickstart's run with auto and with fp32, `rounds` interleaved rounds of each."""
    import tempfile

    from dmssl.trainer import fit

    runs: dict[str, list[dict[str, Any]]] = {"auto": [], "no": []}
    for _ in range(rounds):
        for mode in runs:
            with tempfile.TemporaryDirectory() as folder:
                summary = fit(resolve(["recipe=quickstart", f"trainer.max_steps={steps}", "trainer.progress_bar=false",
                                       f"trainer.mixed_precision={mode}", f"output_dir={folder}", *extra]))
            runs[mode].append({key: summary[key] for key in ("wall_seconds", "train_seconds", "steps", "stop_reason",
                                                             "mixed_precision", "precision_reason", "test_accuracy",
                                                             "precision_step_seconds")})
    auto_wall = statistics.median(r["wall_seconds"] for r in runs["auto"])
    fp32_wall = statistics.median(r["wall_seconds"] for r in runs["no"])
    return {"steps": steps, "rounds": rounds, "extra": extra, "runs": runs, "cpu": cpu_description(),
            "auto_over_fp32_wall": auto_wall / fp32_wall}


def auto_markdown(report: dict[str, Any]) -> str:
    p = report["auto"]
    cpu = p["cpu"]
    lines = [f"Measured {report['date']} on {cpu['model']} ({', '.join(cpu['bf16_flags']) or 'no native bf16'}), "
             f"{report['machine']} (`{report['command']}`): the quickstart as a user starts it, "
             f"{p['steps']} steps, {p['rounds']} rounds of each, interleaved.", "",
             "| run | auto chose | wall seconds per round | steps reached | test accuracy |", "|---|---|---|---|---|"]
    for mode, label in (("auto", "`trainer.mixed_precision=auto` (the default)"), ("no", "`trainer.mixed_precision=no`")):
        rows = p["runs"][mode]
        chosen = ", ".join(sorted({"fp32" if r["mixed_precision"] == "no" else r["mixed_precision"] for r in rows}))
        lines.append(f"| {label} | {chosen if mode == 'auto' else '-'} | "
                     + ", ".join(f"{r['wall_seconds']:.1f}" for r in rows) + " | "
                     + ", ".join(str(r["steps"]) for r in rows) + " | "
                     + ", ".join(f"{100 * r['test_accuracy']:.1f}" for r in rows) + " |")
    reasons = sorted({r["precision_reason"] for r in p["runs"]["auto"]})
    lines += ["", f"auto / fp32 wall time (medians): **{p['auto_over_fp32_wall']:.3f}**. auto's lines: "
              + "; ".join(f"`{r}`" for r in reasons) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (CI smoke run)")
    parser.add_argument("--cifar", help="CIFAR-10 image-folder archive, for the loading benchmark")
    parser.add_argument("--fsdd", help="FSDD recordings archive, for the loading benchmark")
    parser.add_argument("--imdb", help="IMDB folder (train/unsup/test JSON lines), for the loading benchmark")
    parser.add_argument("--recipes", default="quickstart,cifar,fsdd,imdb",
                        help="which recipes (c) and (d) time, of those whose data is given (default: all)")
    parser.add_argument("--sections", default="abcd",
                        help="which parts to run: any of a, b, c, d, p (default: abcd)")
    parser.add_argument("--whisper", help="(f): a Whisper model folder or name, for the FSDD pretrained recipe")
    parser.add_argument("--timm", help="(f): a timm model folder or name, for the CIFAR-10 pretrained recipe")
    parser.add_argument("--amazon", help="(f): the Amazon multi-domain file, for the cross-domain text recipe")
    parser.add_argument("--auto-steps", type=int, default=1500, help="(p): steps of each quickstart run (its recipe's 1500)")
    parser.add_argument("--auto-rounds", type=int, default=2, help="(p): interleaved rounds of auto and fp32")
    parser.add_argument("--variants", default=",".join(PRECISION_VARIANTS),
                        help=f"(d): comma-separated, the first is the reference; of {', '.join(PRECISION_VARIANTS)}")
    parser.add_argument("--write", type=Path, help="replace the speed (a-c) and precision (d) sections of this markdown file")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in PRECISION_VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(PRECISION_VARIANTS)}")
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    sizes = [64, 256] if args.quick else [64, 256, 1024, 4096]
    widths = [128] if args.quick else [128, 512]
    report: dict[str, Any] = {"date": date.today().isoformat(), "quick": args.quick,
                              "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {DEVICE.type}"
                                         + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else "")}
    chosen = {name.strip() for name in args.recipes.split(",")}
    recipes = [["recipe=quickstart"]] if "quickstart" in chosen else []
    if args.cifar and "cifar" in chosen:
        recipes.append(["recipe=image_cifar10", "model.encoder=small_cnn", f"data.root={args.cifar}"])
    if args.fsdd and "fsdd" in chosen:
        recipes.append(["recipe=audio_fsdd", f"data.root={args.fsdd}"])
    if args.imdb and "imdb" in chosen:
        recipes.append(["recipe=text_sentiment", f"data.root={args.imdb}"])
    if "a" in args.sections or "b" in args.sections or "c" in args.sections:
        base = ["recipe=image_cifar10", "model.encoder=small_cnn"] + (["data.batch_size=16"] if args.quick else [])
        objectives = objective_steps(base, repeats)
        cfg, adapter, images = image_batch(base, 0)
        encoder = adapter.build_encoder().to(DEVICE)
        labeled = images[: cfg.data.batch_size]
        encoder_fb = median_time(lambda: encoder(labeled).float().pow(2).mean().backward(), repeats)
        report |= {"sizes": sizes, "widths": widths, "objectives": objectives, "encoder_fb_s": encoder_fb,
                   "distances": distance_costs(sizes, widths, repeats, encoder_fb),
                   "loading": [loader_vs_step(recipe, repeats) for recipe in recipes]}
    if "d" in args.sections:
        report |= {"variants": variants, "precision": []}
        for recipe in recipes:  # saved after each recipe: a long run cut short keeps what it measured
            report["precision"].append(precision_variants(recipe, 2 if args.quick else 5, variants))
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    if "f" in args.sections:
        cached = []
        if args.fsdd and args.whisper:
            cached.append(["recipe=audio_fsdd_pretrained", f"data.root={args.fsdd}", f"modality.pretrained={args.whisper}"])
        if args.cifar and args.timm:
            cached.append(["recipe=image_cifar10", "model.encoder=pretrained", f"data.root={args.cifar}",
                           f"modality.pretrained={args.timm}", "modality.pretrained_size=128", "data.eval_batch_size=64",
                           "data.batch_size=8", "data.mu=2"])  # 56 images a step: a full CPU step of EfficientNet is seconds
        if args.imdb:  # all-MiniLM-L6-v2, installed from PyPI with the [text] extra
            cached.append(["recipe=text_sentiment", f"data.root={args.imdb}", "data.test_subset=256"])
        if args.amazon:  # reviews of many lengths: where the cache's length order pays
            cached.append(["recipe=text_amazon_shift", f"modality.train_files=[{args.amazon}]"])
        report["cache"] = [cache_costs(recipe, 2 if args.quick else 5) for recipe in cached]
    if "p" in args.sections:
        report["auto"] = auto_versus_fp32(args.auto_steps, args.auto_rounds, ["data.num_workers=0"] if args.quick else [])
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    texts = []
    if report.get("cache"):
        texts.append(("feature-cache", cache_markdown(report)))
    if "auto" in report:
        texts.append((f"precision-auto-{report['auto']['cpu']['kind'].replace(' ', '-')}", auto_markdown(report)))
    if "objectives" in report:
        texts.append(("speed", markdown(report)))
    if "precision" in report:
        texts.append(("precision", precision_markdown(report)))
    for _, text in texts:
        print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        for name, text in texts:
            write_section(args.write, name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
