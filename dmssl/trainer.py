"""The training loop: `fit(cfg) -> summary`, readable top to bottom.

Accelerate owns devices, processes and mixed precision (`prepare`, `backward`, `autocast`,
`gather_for_metrics`); this file owns the order of things. One step:

    batch  = steps[s]                       # built ahead of time by DataLoader workers
    z      = model(batch.inputs)            # one forward pass over every view of the step
    loss   = objective(split(z), s)         # supervised / fixmatch / sscl / dmssl
    backward, clip, optimizer step, EMA update
    log / evaluate / checkpoint when due; stop at max_steps or max_minutes

A run folder holds config.yaml, metrics.jsonl (one line per evaluation), checkpoints/ and, at the
end, summary.json. `resume=auto` continues from the newest readable checkpoint and, on CPU,
reproduces the uninterrupted run exactly: every random choice is seeded by the step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, send_to_device
from torch import nn
from torch.utils.data import DataLoader

from dmssl.checkpoint import load_checkpoint, load_latest_valid
from dmssl.classifier import write_model_description
from dmssl.config import Config, TrainerConfig, config_to_dict, flatten
from dmssl.data import (
    EvalCollate,
    EvalDataset,
    StepDataset,
    check_raw_data,
    in_groups,
    long_tailed,
    seeded_subset,
    split_dev,
    split_labeled,
)
from dmssl.distributed import this_process_only
from dmssl.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from dmssl.feature_cache import CachedSample, CachedViews, encoding, open_or_build
from dmssl.metrics import ClassificationReport, confusion_matrix
from dmssl.modality import RawData, build_adapter
from dmssl.model import SSLModel, init_prototypes_from_labeled
from dmssl.objective import objective_from_config, run_objective
from dmssl.precision import Stopwatch, choose_precision
from dmssl.pretrained import apply_freeze, cached_prefix_blocks
from dmssl.run_dir import (
    EmbeddingSnapshot,
    RunLock,
    append_json_line,
    changed_settings,
    check_run_dir,
    code_version,
    keep_metric_lines_up_to,
    save_train_state,
    write_run_dir,
)
from dmssl.shift_report import shift_report
from dmssl.train_state import TrainState


class EMA:
    """Exponential moving average of a model's weights (buffers are copied), used for evaluation.

    The decay is min(decay, (1 + t) / (10 + t)) at update t, so that a short run's average is not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.module.parameters(), model.parameters(), strict=True):
            shadow.lerp_(live.detach(), 1.0 - decay)
        for shadow, live in zip(self.module.buffers(), model.buffers(), strict=True):
            shadow.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def learning_rate(step: int, cfg: TrainerConfig) -> float:
    """Linear warm-up, then FixMatch's cosine decay lr * cos(pi * cycles * progress)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * math.cos(math.pi * cfg.cosine_cycles * min(1.0, progress))


def build_optimizer(model: nn.Module, cfg: TrainerConfig, objective: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW; biases, norm parameters and prototypes get no weight decay (as in FixMatch).

    Each group carries `lr_scale`: `head_lr_scale` for the projection head, prototypes and the objective's
    own parameters (an adversary's domain classifier: new layers too), 1 for the encoder.
    """
    named = list(model.named_parameters())
    if objective is not None:
        named += [(f"objective.{name}", param) for name, param in objective.named_parameters()]
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in named:
        if param.requires_grad:
            is_head = not name.startswith("encoder.")
            decays = param.ndim > 1 and "prototype" not in name
            buckets.setdefault((is_head, decays), []).append(param)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0,
               "lr_scale": cfg.head_lr_scale if is_head else 1.0}
              for (is_head, decays), params in buckets.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, num_classes: int) -> ClassificationReport:
    """The confusion matrix (and what follows from it) of the model's predictions over a whole split.

    `gather_for_metrics` drops the samples a distributed sampler repeats to even out the last batch.
    """
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch in loader:
        with accelerator.autocast():
            predictions = model.predict(batch["inputs"])
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        matrix += confusion_matrix(labels.cpu(), predictions.cpu(), num_classes)
    return ClassificationReport(matrix)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """In a DataLoader worker: ignore SIGINT and SIGTERM. Ctrl-C or a scheduler's SIGTERM reach the whole
    process group; the main process saves a checkpoint and shuts its workers down, where a worker that died
    of the signal first would make the loader raise (and print a worker's traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag, so the loop can save a checkpoint before it exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class RunData:
    """The run's samples, split: labeled, dev (held out), the unlabeled pool, and the test subset."""

    labeled: list[Any]
    labeled_labels: list[int]
    labeled_indices: list[int]
    dev: list[Any]
    dev_labels: list[int]
    pool: list[tuple[Any, int]]  # (sample, true label or -1): the true label only feeds diagnostics
    test: list[Any]
    test_labels: list[int]
    class_names: list[str]
    # Where each sample came from: a training index (len(raw.train) + j for raw.unlabeled[j]), a test index.
    dev_indices: list[int] = field(default_factory=list)
    pool_indices: list[int] = field(default_factory=list)
    test_indices: list[int] = field(default_factory=list)
    transductive: bool = False  # the test is the pool (test_indices are training indices)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def cached_inputs(adapter: Any, raw: RawData, data: RunData, encoder: nn.Module, cfg: Config,
                  process: PartialState) -> tuple[Any, RunData]:
    """(the adapter, the run's data) as they are, or, for a fully frozen encoder (or a frozen prefix the encoder
    can start from) with `model.cached_views` > 0, a `CachedViews` over the feature cache and the same splits as
    cache rows (dmssl/feature_cache.py)."""
    if cfg.model.cached_views == 0:
        return adapter, data
    prefix_blocks = cached_prefix_blocks(encoder, cfg.model.freeze)
    if prefix_blocks is None:
        if isinstance(cfg.model.freeze, int) and cfg.model.freeze > 0:
            process.print(f"feature cache: not used ({type(encoder).__name__} cannot start its forward pass after "
                          f"{cfg.model.freeze} frozen blocks); every step runs the whole encoder")
        return adapter, data
    if process.num_processes > 1:
        raise ConfigError("the feature cache (a frozen encoder or prefix) trains in one process; set "
                          "model.cached_views=0 to run several processes on the full encoder")
    # The cache holds every sample, in the original order, unless the run draws a part (data.train_subset,
    # max_unlabeled, test_subset): then that part. Runs that only split the same samples differently (seeds,
    # groups, dev, a transductive test) share one cache; so do runs of one fixed part (data.subset_seed).
    n = len(raw.train)
    used = (sorted(set(data.labeled_indices) | set(data.dev_indices) | set(data.pool_indices))
            if cfg.data.train_subset is not None or cfg.data.max_unlabeled is not None
            else list(range(n + len(raw.unlabeled))))
    if cfg.data.test_subset is None:
        tests = list(range(len(raw.test)))
    else:
        tests = [] if data.transductive else sorted(set(data.test_indices))
    subset = RawData(train=[raw.train[i] if i < n else raw.unlabeled[i - n] for i in used],
                     train_labels=[raw.train_labels[i] if i < n else -1 for i in used],
                     test=[raw.test[j] for j in tests], test_labels=[raw.test_labels[j] for j in tests],
                     class_names=list(raw.class_names))
    cache = open_or_build(adapter, subset, encoder, cfg.model.cached_views, cfg.data.cache_dir, process.device,
                          cfg.data.eval_batch_size, log=process.print,
                          precision=lambda: caching_precision(adapter, subset, encoder, cfg, process, prefix_blocks),
                          prefix_blocks=prefix_blocks)
    row, test_row = {i: r for r, i in enumerate(used)}, {j: r for r, j in enumerate(tests)}
    rows = [CachedSample("train", r) for r in range(len(used))]
    return CachedViews(adapter, cache), dataclasses.replace(
        data, labeled=[rows[row[i]] for i in data.labeled_indices], dev=[rows[row[i]] for i in data.dev_indices],
        pool=[(rows[row[i]], y) for i, (_, y) in zip(data.pool_indices, data.pool, strict=True)],
        test=[rows[row[i]] if data.transductive else CachedSample("test", test_row[i]) for i in data.test_indices])


def caching_precision(adapter: Any, subset: RawData, encoder: nn.Module, cfg: Config, process: PartialState,
                      prefix_blocks: int = 0) -> str:
    """The number format the frozen encoder (or prefix) fills the cache in: `trainer.mixed_precision` as for
    training ('auto' times it on a batch of test views in fp32 and bf16 where bf16 is native); 'no' or 'bf16'."""
    batch = send_to_device(adapter.collate([adapter.test_view(s) for s in (subset.test or subset.train)[:64]]), process.device)
    model = encoding(encoder.to(process.device).eval(), prefix_blocks)

    @torch.no_grad()
    def measure(mode: str) -> float:
        with Stopwatch(process.device) as watch, torch.autocast(process.device.type, dtype=torch.bfloat16,
                                                                 enabled=mode == "bf16"):
            model(batch)
        return watch.seconds

    chosen = choose_precision(cfg.trainer.mixed_precision, torch.cuda.is_available(), measure=measure)
    process.print(f"feature cache: encoding in {'bf16' if chosen.mode == 'bf16' else 'fp32'} ({chosen.reason})")
    return "bf16" if chosen.mode == "bf16" else "no"


def split_run_data(raw: RawData, cfg: Config) -> RunData:
    """Seeded splits of the adapter's data: labeled, dev (outside labeled and pool), pool, test subset.

    With `data.labeled_groups` / `data.target_groups` the labeled split comes from some groups and the
    pool, dev and test from others: the labels of samples outside a side's groups are hidden from
    that side's draw, so without groups the draws are exactly those of a run without them. With
    `data.pool_imbalance_ratio` > 1 the pool is thinned to a long-tailed class mix (`long_tailed`).
    """
    subset_seed = cfg.seed if cfg.data.subset_seed is None else cfg.data.subset_seed
    n = len(raw.train)
    # data.train_subset: a seeded part of every training sample, labeled and unlabeled alike (index n + j is
    # raw.unlabeled[j]); outside it a label is hidden from both draws, as for groups.
    universe = seeded_subset(n + len(raw.unlabeled), cfg.data.train_subset, subset_seed + 3)
    pool_ids = [i for i in universe if i < n]
    extra_unlabeled = [i for i in universe if i >= n]
    test_ids = list(range(len(raw.test)))
    labeled_draw = dev_draw = raw.train_labels
    if cfg.data.train_subset is not None:
        inside = set(pool_ids)
        labeled_draw = dev_draw = [y if i in inside else -1 for i, y in enumerate(raw.train_labels)]
    if cfg.data.labeled_groups is not None or cfg.data.target_groups is not None:
        source = in_groups(raw.train_groups, cfg.data.labeled_groups, "data.labeled_groups", len(raw.train))
        target = in_groups(raw.train_groups, cfg.data.target_groups, "data.target_groups", len(raw.train))
        target_test = in_groups(raw.test_groups, cfg.data.target_groups, "data.target_groups", len(raw.test)) \
            if len(raw.test) else []  # a transductive run's data may have no test set
        labeled_draw = [y if ok else -1 for y, ok in zip(labeled_draw, source, strict=True)]
        dev_draw = [y if ok else -1 for y, ok in zip(dev_draw, target, strict=True)]
        pool_ids = [i for i in pool_ids if target[i]]
        test_ids = [i for i in test_ids if target_test[i]]
        if cfg.data.target_groups is not None and raw.unlabeled:
            raise DataError("data.target_groups is set, but this data has unlabeled samples with no group; "
                            "they cannot be placed on either side")
    labeled_idx = split_labeled(labeled_draw, raw.num_classes, cfg.data.num_labels, cfg.data.labels_per_class,
                                cfg.seed)
    unlabeled_classes = sorted(set(range(raw.num_classes)) - {raw.train_labels[i] for i in labeled_idx})
    if unlabeled_classes:  # only groups can cause it: check_raw_data saw every class labeled somewhere
        names = [raw.class_names[k] for k in unlabeled_classes]
        raise DataError(f"data.labeled_groups={cfg.data.labeled_groups} leaves classes without a labeled sample: "
                        f"{names[:10]}; add groups that hold them, or drop those classes from the data")
    dev_idx = split_dev(dev_draw, labeled_idx, cfg.data.dev_size, cfg.seed + 5)
    held_out = set(dev_idx)
    pool_idx = [i for i in pool_ids if i not in held_out] + extra_unlabeled
    if not pool_idx:
        raise DataError("the unlabeled pool is empty: data.target_groups leaves no training sample")
    if cfg.data.pool_imbalance_ratio > 1.0:
        pool_labels = [raw.train_labels[i] if i < n else -1 for i in pool_idx]
        kept = long_tailed(pool_labels, raw.num_classes, cfg.data.pool_imbalance_ratio, cfg.seed + 13)
        pool_idx = [pool_idx[k] for k in kept]
    pool_idx = [pool_idx[k] for k in seeded_subset(len(pool_idx), cfg.data.max_unlabeled, subset_seed + 7)]
    if cfg.data.transductive_test:  # the pool is the test: training indices (config checks: target side only)
        test_ids = list(pool_idx)
    test_ids = [test_ids[i] for i in seeded_subset(len(test_ids), cfg.data.test_subset, subset_seed + 11)]
    if not test_ids:
        raise DataError("the test set is empty: data.target_groups leaves no test sample")
    pool = [(raw.train[i], raw.train_labels[i]) if i < n else (raw.unlabeled[i - n], -1) for i in pool_idx]
    test_from = (raw.train, raw.train_labels) if cfg.data.transductive_test else (raw.test, raw.test_labels)
    return RunData(labeled=[raw.train[i] for i in labeled_idx], labeled_labels=[raw.train_labels[i] for i in labeled_idx],
                   labeled_indices=labeled_idx, dev=[raw.train[i] for i in dev_idx],
                   dev_labels=[raw.train_labels[i] for i in dev_idx], pool=pool,
                   test=[test_from[0][i] for i in test_ids], test_labels=[test_from[1][i] for i in test_ids],
                   class_names=list(raw.class_names), dev_indices=dev_idx, pool_indices=pool_idx, test_indices=test_ids,
                   transductive=cfg.data.transductive_test)


class Evaluator:
    """Test (and, with data.dev_size, dev) metrics of the EMA model; the last reports stay readable."""

    def __init__(self, adapter: Any, data: RunData, cfg: Config, accelerator: Accelerator) -> None:
        def loader(samples: list, labels: list[int]) -> DataLoader:
            return accelerator.prepare(DataLoader(
                EvalDataset(adapter, samples, labels), batch_size=cfg.data.eval_batch_size, collate_fn=EvalCollate(adapter),
                num_workers=min(cfg.data.num_workers, 2), generator=torch.Generator().manual_seed(cfg.seed)))

        self.accelerator, self.num_classes = accelerator, data.num_classes
        self.test_loader = loader(data.test, data.test_labels)
        self.dev_loader = loader(data.dev, data.dev_labels) if data.dev else None
        self.test_report: ClassificationReport | None = None
        self.dev_report: ClassificationReport | None = None

    @property
    def test_accuracy(self) -> float:
        return self.test_report.accuracy if self.test_report else float("nan")

    @property
    def test_macro_f1(self) -> float:
        return self.test_report.macro_f1 if self.test_report else float("nan")

    @property
    def dev_accuracy(self) -> float:
        return self.dev_report.accuracy if self.dev_report else float("nan")

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """Evaluate; the figures one metrics.jsonl line holds (per-class accuracy of absent classes is None)."""
        self.test_report = evaluate(model, self.test_loader, self.accelerator, self.num_classes)
        figures = {"test_accuracy": self.test_report.accuracy, "test_macro_f1": self.test_report.macro_f1,
                   "test_per_class_accuracy": json_floats(self.test_report.per_class_accuracy)}
        if self.dev_loader is not None:
            self.dev_report = evaluate(model, self.dev_loader, self.accelerator, self.num_classes)
            figures |= {"dev_accuracy": self.dev_report.accuracy, "dev_macro_f1": self.dev_report.macro_f1}
        return figures


def json_floats(values: list[float]) -> list[float | None]:
    """NaN (undefined) as None, which JSON can hold."""
    return [None if math.isnan(v) else round(v, 6) for v in values]


def fit(cfg: Config) -> dict[str, Any]:
    """Train as `cfg` says; return the summary also written to `summary.json`."""
    started = time.monotonic()
    run_dir = check_run_dir(cfg)
    # cpu=True on a machine without CUDA lets several processes (torchrun) form a gloo group.
    process = PartialState(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    if cfg.output_dir is None and process.num_processes > 1:
        raise ConfigError("set output_dir= when training with several processes, so that they share one run folder")
    with RunLock(run_dir, active=process.is_main_process):
        return train_in(run_dir, cfg, process, started)


def train_in(run_dir: Path, cfg: Config, process: PartialState, started: float) -> dict[str, Any]:
    """The run itself, in its checked and locked folder."""
    process.wait_for_everyone()  # every process has checked before the main one writes
    if process.is_main_process:
        write_run_dir(cfg, run_dir)
    process.wait_for_everyone()

    # ==== data: the adapter loads, the core splits ====
    adapter = build_adapter(cfg)
    raw = adapter.load()
    check_raw_data(raw, needs_test=not cfg.data.transductive_test)
    data = split_run_data(raw, cfg)

    if process.is_main_process:  # what predicting with the trained model needs besides weights and config
        write_model_description(run_dir, data.class_names, adapter)

    # ==== model, objective, optimiser: the training state ====
    objective = objective_from_config(cfg, data.num_classes)
    encoder = adapter.build_encoder()
    process.print(apply_freeze(encoder, cfg.model.freeze))
    # With a frozen encoder, its outputs are computed once (shared by every run that matches) and the run
    # trains on them: `inputs` stands in for the adapter wherever samples become batches.
    inputs, data = cached_inputs(adapter, raw, data, encoder, cfg, process)
    model = SSLModel(encoder, data.num_classes, cfg.model.proj_hidden_dim, cfg.model.proj_dim,
                     linear_head=objective.head == "linear")
    if cfg.model.prototype_init == "labeled_mean":  # before the EMA copies the model; a resume overwrites it
        init_prototypes_from_labeled(model, inputs, data.labeled, data.labeled_labels, cfg.data.eval_batch_size)
    if cfg.trainer.channels_last:  # 4-D weights only; the first convolution then returns NHWC activations
        model.to(memory_format=torch.channels_last)
    objective.prepare(model)
    optimizer = build_optimizer(model, cfg.trainer, objective)
    state = TrainState(model, EMA(model, cfg.trainer.ema_decay), optimizer, objective, data.labeled_indices)
    # How far apart labeled and unlabeled data start, before any step (and before a resume loads weights).
    shift = None
    if cfg.trainer.shift_report and process.is_main_process and data.pool:
        shift = shift_report(model.to(process.device), inputs, data.labeled, [s for s, _ in data.pool], cfg.seed,
                             process.device, cfg.data.eval_batch_size)
        if shift is not None:
            process.print(shift.describe())
    checkpoints = run_dir / "checkpoints"
    resumed_from = resume(state, cfg, checkpoints)
    steps_data = StepDataset(inputs, data.labeled, data.labeled_labels, [s for s, _ in data.pool],
                             [y for _, y in data.pool], cfg.data.batch_size, cfg.data.mu, objective.unlabeled_views,
                             cfg.trainer.max_steps, cfg.seed, process.process_index, process.num_processes)

    # ==== precision: measured on the first real step where auto decides, kept on resume ====
    # The main process measures and the others take its choice: how many steps a probe times depends on
    # its own clock, so probes in every process would not even agree on how many steps they take.
    measure = (step_timer(model, objective, lambda: steps_data[state.step], state.step, process.device)
               if state.step < cfg.trainer.max_steps and process.is_main_process else None)
    precision = choose_precision(cfg.trainer.mixed_precision, torch.cuda.is_available(), cfg.trainer.channels_last,
                                 measure=measure, recorded=state.precision)
    if process.num_processes > 1:  # timings differ between processes; all of them compute as the main one chose
        shared = [precision]
        broadcast_object_list(shared, from_process=0)
        precision = shared[0]
    state.precision = precision.record()
    # Accelerate keeps its precision in a process-wide singleton; a second run in one process (a notebook,
    # a benchmark) may choose another. The process group (PartialState) is left as it is.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision.mode,
                              log_with=None if cfg.trainer.log_with == "none" else cfg.trainer.log_with,
                              project_dir=str(run_dir))
    accelerator.print(precision.describe())
    if resumed_from:
        accelerator.print(f"resumed from {resumed_from} at step {state.step}")
    state.ema.module.to(accelerator.device)
    objective.to(accelerator.device)  # in place: the optimiser keeps its references to a learning distance's parameters
    if cfg.trainer.compile:  # in place: parameter names, checkpoints and the EMA copy stay as they are
        model.encoder.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics_file, train_log = run_dir / "metrics.jsonl", run_dir / "train.jsonl"
    if accelerator.is_main_process:
        keep_metric_lines_up_to(metrics_file, state.step)
        keep_metric_lines_up_to(train_log, state.step)

    workers = cfg.data.num_workers
    train_loader = DataLoader(steps_data, batch_size=None, sampler=range(state.step, cfg.trainer.max_steps),
                              num_workers=workers, prefetch_factor=4 if workers else None,
                              worker_init_fn=leave_stop_signals_to_the_main_process,
                              generator=torch.Generator().manual_seed(cfg.seed), pin_memory=torch.cuda.is_available())
    evaluator = Evaluator(inputs, data, cfg, accelerator)
    if cfg.trainer.log_with != "none":
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config_to_dict(cfg)).items()}
        accelerator.init_trackers(run_dir.name, config=hparams)  # trackers accept scalars only
    snapshot = EmbeddingSnapshot(inputs, data.labeled, data.labeled_labels, data.pool, cfg.seed, cfg.data.eval_batch_size)
    if accelerator.is_main_process and cfg.trainer.save_embeddings and state.step == 0:
        snapshot.save(state.ema.module, accelerator.device, run_dir / "embeddings" / "step_00000000.npz")

    # ==== the loop ====
    budget_seconds = cfg.trainer.max_minutes * 60 if cfg.trainer.max_minutes else math.inf
    elapsed_before = state.elapsed_seconds
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    last_train_logs: dict[str, float] = {}
    progress = make_progress_bar(accelerator, cfg, state.step)
    stop_reason = "max_steps"
    loop_started = waiting_since = time.monotonic()
    data_wait = 0.0  # seconds the loop stood waiting for the DataLoader: the loader keeps up when this stays small
    with StopRequest() as stop:
        for batch in train_loader:
            data_wait += time.monotonic() - waiting_since
            step = state.step
            lr = learning_rate(step, cfg.trainer)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            model.train()
            batch = send_to_device(batch, accelerator.device)
            out = run_objective(model, objective, batch, step, unwrap(model, accelerator).prototypes)
            if not torch.isfinite(out.loss):
                terms = {k: round(float(v), 6) for k, v in out.logs.items()}
                raise TrainingDiverged(
                    f"loss is {out.loss.item()} at step {step} (terms: {terms}); the last good checkpoint in "
                    f"{checkpoints} is kept; lower trainer.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out.loss)
            if cfg.trainer.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            optimizer.step()
            state.ema.update(unwrap(model, accelerator))
            state.step = step = step + 1
            # Sums stay on the device until logging time: no host sync per term and step.
            for key, value in out.logs.items():  # NaN = undefined this step (e.g. no confident sample)
                value = value.detach().float()
                defined = ~torch.isnan(value)
                sums[key] = sums.get(key, 0.0) + torch.where(defined, value, 0.0)
                counts[key] = counts.get(key, 0.0) + defined.float()

            state.elapsed_seconds = elapsed = elapsed_before + time.monotonic() - loop_started
            out_of_time = elapsed >= budget_seconds
            finished = step >= cfg.trainer.max_steps or out_of_time or stop.signal is not None
            if step % cfg.trainer.log_every == 0 or finished:
                averages = {k: float(sums[k]) / n if (n := float(counts[k])) else None for k in counts}
                sums, counts = {}, {}
                if cfg.trainer.log_with != "none":
                    accelerator.log({f"train/{k}": v for k, v in averages.items() if v is not None} | {"train/lr": lr},
                                    step=step)
                progress.set_postfix(loss=f"{averages.get('loss') or float('nan'):.3f}", acc=f"{evaluator.test_accuracy:.3f}",
                                     f1=f"{evaluator.test_macro_f1:.3f}", mask=f"{averages.get('mask_rate') or 0.0:.2f}")
                last_train_logs = averages
                if accelerator.is_main_process:
                    append_json_line(train_log, {"step": step, "lr": lr, **averages})
            if step % cfg.trainer.eval_every == 0 or finished:
                accuracies = evaluator(state.ema.module)
                if accelerator.is_main_process:
                    append_json_line(metrics_file, {"step": step, **accuracies, "lr": lr,
                                                    "elapsed_seconds": round(elapsed, 2), **last_train_logs})
                if cfg.trainer.log_with != "none":
                    accelerator.log({f"eval/{k}": v for k, v in accuracies.items()}, step=step)
            if (step % cfg.trainer.checkpoint_every == 0 or finished) and accelerator.is_main_process:
                save_train_state(state, checkpoints, cfg)
            progress.update(1)
            if finished:
                stop_reason = ("signal" if stop.signal is not None else "max_minutes" if out_of_time else "max_steps")
                break
            waiting_since = time.monotonic()
    loop_seconds = time.monotonic() - loop_started
    progress.close()
    if math.isnan(evaluator.test_accuracy):  # nothing left to train (resumed a finished run): evaluate once
        evaluator(state.ema.module)

    if stop_reason == "signal":
        accelerator.print(f"stopped by signal {stop.signal} at step {state.step}; checkpoint saved, resume with resume=auto")
        accelerator.end_training()
        raise KeyboardInterrupt
    summary = {
        "test_accuracy": evaluator.test_accuracy,
        "test_macro_f1": evaluator.test_macro_f1,
        "test_per_class_accuracy": json_floats(evaluator.test_report.per_class_accuracy),
        "class_names": data.class_names,
        "dev_accuracy": evaluator.dev_accuracy if evaluator.dev_loader is not None else None,
        "dev_macro_f1": evaluator.dev_report.macro_f1 if evaluator.dev_report is not None else None,
        "steps": state.step,
        "wall_seconds": round(time.monotonic() - started + elapsed_before, 2),
        "train_seconds": round(elapsed_before + loop_seconds, 2),
        "stop_reason": stop_reason,
        "objective": cfg.objective.name,
        "distance": cfg.distance.name if objective.needs_distance else None,
        "pseudo_label": cfg.pseudo_label.name if objective.unlabeled_views else None,
        "recipe": cfg.recipe,
        "modality": cfg.modality.name,
        "encoder": cfg.model.encoder,
        "num_labeled": len(data.labeled),
        "labels": ("every labeled sample" if cfg.data.num_labels is None and cfg.data.labels_per_class is None
                   else "a balanced budget"),
        "test_set": "transductive: the unlabeled pool" if data.transductive else "held out",
        "shift": shift.record() if shift is not None else None,
        "num_unlabeled": len(data.pool),
        "num_dev": len(data.dev),
        "num_test": len(data.test),
        "num_test_evaluated": evaluator.test_report.total,
        "seed": cfg.seed,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": accelerator.mixed_precision,
        "precision_reason": precision.reason,
        "precision_step_seconds": {k: round(v, 6) for k, v in precision.step_seconds.items()},
        "channels_last": precision.channels_last,
        "compiled": cfg.trainer.compile,
        "data_wait_share": round(data_wait / max(loop_seconds, 1e-9), 4),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "run_dir": str(run_dir),
        "code_version": code_version(),
        "torch_version": torch.__version__,
    }
    if accelerator.is_main_process:
        if cfg.trainer.save_embeddings:
            snapshot.save(state.ema.module, accelerator.device, run_dir / "embeddings" / f"step_{state.step:08d}.npz")
        write_confusion_matrix(run_dir, evaluator.test_report, data.class_names, state.step)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    # end_training destroys the process group: no process tears it down while the main one still writes.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(final_line(summary, evaluator.test_report, data.class_names))
    return summary


def write_confusion_matrix(run_dir: Path, report: ClassificationReport, class_names: list[str], step: int) -> None:
    confusion = {"split": "test", "step": step, **report.to_dict(class_names)}
    confusion["per_class_accuracy"] = json_floats(confusion["per_class_accuracy"])
    (run_dir / "confusion_matrix.json").write_text(json.dumps(confusion) + "\n", encoding="utf-8")


def final_line(summary: dict[str, Any], report: ClassificationReport, class_names: list[str]) -> str:
    """The run's last line: dev and test accuracy, macro-F1, the worst class, steps, time, folder."""
    dev = f"dev_accuracy={summary['dev_accuracy']:.4f} " if summary["dev_accuracy"] is not None else ""
    per_class = [(a, n) for a, n in zip(report.per_class_accuracy, class_names, strict=True) if not math.isnan(a)]
    worst = f"worst_class={min(per_class)[1]}:{min(per_class)[0]:.3f} " if per_class else ""
    return (f"{dev}test_accuracy={summary['test_accuracy']:.4f} test_macro_f1={summary['test_macro_f1']:.4f} {worst}"
            f"steps={summary['steps']} wall_seconds={summary['wall_seconds']} run_dir={summary['run_dir']}")


def resume(state: TrainState, cfg: Config, checkpoints: Path) -> Path | None:
    """Load the checkpoint `cfg.resume` names (auto: the newest readable one) into `state`; its path, or None."""
    if cfg.resume == "never":
        return None
    found = load_latest_valid(checkpoints) if cfg.resume == "auto" else (Path(cfg.resume), load_checkpoint(Path(cfg.resume)))
    if found is None:
        return None
    path, saved = found
    if cfg.resume != "auto" and saved.get("config"):  # auto's folder was checked against its config.yaml
        changed = changed_settings(flatten(json.loads(saved["config"])), cfg)
        if changed:
            raise CheckpointError(f"resume={cfg.resume!r} was saved by a run with other settings ({changed}); "
                                  "resume with the checkpoint's settings, or start a new run")
    state.load_state_dict(saved, source=str(path))
    return path


def step_timer(model: SSLModel, objective: nn.Module, first_step: Callable[[], dict[str, Any]], step: int,
               device: torch.device) -> Callable[[str], float]:
    """`measure(mode) -> seconds` of one forward+backward of the run's first step, for auto's precision probe.

    It runs on copies of the model and objective (their batch-norm statistics and pseudo-label buffers move)
    inside a forked RNG, so the run itself is the same with or without the probe; only the model's forward
    is autocast, as Accelerate does in the run. The step's batch is built on first use.
    """
    copies: dict[str, Any] = {}

    def measure(mode: str) -> float:
        if not copies:
            copies.update(model=copy.deepcopy(model).to(device).train(), objective=copy.deepcopy(objective).to(device),
                          batch=send_to_device(first_step(), device))
        probe_model, probe_objective, batch = copies["model"], copies["objective"], copies["batch"]

        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                return probe_model(*args, **kwargs)

        # One process's step, with no collective: the other processes are not probing alongside it.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), this_process_only(), \
                Stopwatch(device) as watch:
            out = run_objective(forward, probe_objective, batch, step, probe_model.prototypes)
            out.loss.backward()
        probe_model.zero_grad(set_to_none=True)
        return watch.seconds

    return measure


def unwrap(model: nn.Module, accelerator: Accelerator) -> SSLModel:
    return accelerator.unwrap_model(model)


class _NoBar:
    def set_postfix(self, **kwargs: Any) -> None: ...
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def make_progress_bar(accelerator: Accelerator, cfg: Config, start: int) -> Any:
    if not (cfg.trainer.progress_bar and accelerator.is_main_process):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=start, dynamic_ncols=True, desc=cfg.objective.name)

