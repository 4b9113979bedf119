"""The configuration schema: one dataclass per concern; `config.yaml` in a run folder is a `Config`.

`objective`, `pseudo_label` and `distance` are `MethodConfig(name, options)`: the options dataclass is
declared by the registered class beside its code. Reading recipes and `key=value` overrides into a
`Config` (types, unknown keys, suggestions) is `dmssl/recipe.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmssl.errors import ConfigError


@dataclass
class DataConfig:
    """Where the data comes from and how batches are drawn."""

    dataset: str = "folder"  # the adapter's source: e.g. cifar10, digits, folder, imdb, files
    root: str | None = None  # a folder or a .tar.gz; the adapter documents its layout
    num_labels: int | None = None  # total labeled samples, balanced over classes
    labels_per_class: int | None = None  # alternative to num_labels
    batch_size: int = 64  # labeled samples per step (per process)
    mu: int = 7  # unlabeled samples per labeled sample in a step
    eval_batch_size: int = 256  # samples per evaluation batch
    num_workers: int = 2  # DataLoader workers that build whole training steps ahead of time
    test_subset: int | None = None  # evaluate on a fixed, seeded subset of the test set
    dev_size: int = 0  # labeled training samples held out (never trained on) to choose settings on; 0: none
    max_unlabeled: int | None = None  # cap on the unlabeled pool (seeded subset)
    train_subset: int | None = None  # draw labeled, dev and pool only from a seeded subset of the training samples (unlabeled ones included)
    # Seed of the train_subset, test_subset and max_unlabeled draws; None: the run's seed. A fixed value keeps
    # the same samples for every run seed (only the labeled draw moves), so that a study shares one feature cache.
    subset_seed: int | None = None
    # Test on the unlabeled pool itself (transductive, as domain-adaptation benchmarks do): needs target_groups,
    # so that the pool is the target side; its true labels then score the run and never reach training.
    transductive_test: bool = False
    cache_dir: str | None = None  # decoded-data cache; default ~/.cache/dmssl
    # data.dataset=hf (any modality; dmssl/hf_data.py): a hub name, or data.root = save_to_disk / Parquet / Arrow
    hub_name: str | None = None  # e.g. imdb, cifar10 (where the hub is reachable)
    hub_config: str | None = None  # the data set's configuration name, where it has several
    train_split: str = "train"
    test_split: str = "test"
    unlabeled_split: str | None = None  # a split of unlabeled rows, e.g. IMDB's "unsupervised"
    # A shift between labeled and unlabeled data (docs/distances.md): groups are the adapter's (e.g. speakers).
    labeled_groups: list[str] | None = None  # draw the labeled split only from these groups; None: all
    target_groups: list[str] | None = None  # the unlabeled pool, dev and test come only from these; None: all
    # A class-mix mismatch: >1 thins the unlabeled pool so that class k keeps n_min * ratio^(-k/(K-1)) samples
    # (class 0 the most, class K-1 ratio times fewer); the labeled split, dev and test stay as drawn. 1: off.
    pool_imbalance_ratio: float = 1.0

    def validate(self) -> None:
        if self.num_labels is not None and self.labels_per_class is not None:
            raise ConfigError(
                f"data.num_labels={self.num_labels} and data.labels_per_class="
                f"{self.labels_per_class} are both set; set only one of them"
            )
        _positive("data.num_labels", self.num_labels)
        _positive("data.labels_per_class", self.labels_per_class)
        _positive("data.batch_size", self.batch_size)
        _positive("data.mu", self.mu)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.test_subset", self.test_subset)
        _positive("data.max_unlabeled", self.max_unlabeled)
        _positive("data.train_subset", self.train_subset)
        if self.subset_seed is not None and not 0 <= self.subset_seed < 2**32:
            raise ConfigError(f"data.subset_seed={self.subset_seed} must be in [0, 2**32) or null (the run's seed)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.dev_size < 0:
            raise ConfigError(f"data.dev_size={self.dev_size} must be >= 0")
        if not self.pool_imbalance_ratio >= 1.0:  # also refuses NaN
            raise ConfigError(f"data.pool_imbalance_ratio={self.pool_imbalance_ratio} must be >= 1 (1: the pool as drawn)")
        for key in ("labeled_groups", "target_groups"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ConfigError(f"data.{key}=[] names no group; list at least one, or leave it unset (all groups)")
        if self.transductive_test:
            if self.target_groups is None:
                raise ConfigError("data.transductive_test=true tests on the unlabeled pool: set data.target_groups "
                                  "(the target side), so that the pool holds no labeled sample")
            shared = sorted(set(self.labeled_groups or []) & set(self.target_groups))
            if self.labeled_groups is None or shared:
                raise ConfigError(f"data.transductive_test=true: data.labeled_groups={self.labeled_groups} and "
                                  f"data.target_groups={self.target_groups} must be disjoint"
                                  + (f" (both hold {shared})" if shared else " (set labeled_groups to the source)"))



@dataclass
class ModelConfig:
    """The encoder (built by the modality adapter) and the projection head on top of it."""

    encoder: str = "small_cnn"  # an encoder name the adapter knows
    width: int | None = None  # encoder width; None = the encoder's default
    depth: int | None = None  # encoder depth; None = the encoder's default
    proj_hidden_dim: int = 128
    proj_dim: int = 128  # embedding width: where prototypes, contrast and matching live
    prototype_init: Literal["random", "labeled_mean"] = "random"  # labeled_mean: class means of the labeled embeddings
    freeze: int | Literal["none", "all"] = "none"  # none, all, or the encoder's lower N blocks (dmssl/pretrained.py)
    cached_views: int = 4  # with freeze=all (or freeze=N where the encoder can start after N blocks): K weak and K strong views of each training sample encoded once and cached; 0: no cache

    def validate(self) -> None:
        if isinstance(self.freeze, int) and self.freeze < 0:
            raise ConfigError(f"model.freeze={self.freeze} must be none, all, or a number of blocks >= 0")
        if self.cached_views < 0:
            raise ConfigError(f"model.cached_views={self.cached_views} must be >= 0 (0: no cache)")
        _positive("model.width", self.width)
        _positive("model.depth", self.depth)
        _positive("model.proj_hidden_dim", self.proj_hidden_dim)
        _positive("model.proj_dim", self.proj_dim)



@dataclass
class MethodConfig:
    """A registered method (objective, distance or pseudo-labeller) and its own `Options`.

    In YAML and on the command line the options sit flat beside `name` (`objective.lambda_dm=2`);
    which keys exist is declared by the chosen class's `Options` dataclass, next to the class.
    """

    name: str
    options: Any = None


def method_registries() -> dict[str, tuple[Any, str]]:
    """section -> (registry, default name). Imported late: the method modules import torch."""
    from dmssl.distances import DISTANCES
    from dmssl.objective import OBJECTIVES
    from dmssl.pseudo_label import PSEUDO_LABELLERS

    return {"objective": (OBJECTIVES, "dmssl"), "pseudo_label": (PSEUDO_LABELLERS, "fixed"),
            "distance": (DISTANCES, "mmd")}


# Keys that moved; an old key stops with its new name (recipes and command lines written for 0.1).
MOVED_KEYS = {
    "objective.pseudo_label_threshold": "pseudo_label.threshold",
    "objective.distribution_alignment": "pseudo_label.distribution_alignment",
    "objective.alignment_momentum": "pseudo_label.alignment_momentum",
    "distance.sinkhorn_iterations": "distance.iterations",
}  # an adapter adds its own (`Modality.renamed_keys`): the core names no modality's keys


@dataclass
class TrainerConfig:
    """The loop: budget, optimiser, schedule, EMA, evaluation, checkpoints, logging."""

    max_steps: int = 1000  # optimisation steps; also the length of the cosine schedule
    max_minutes: float | None = None  # stop (and evaluate) when this wall-clock budget is spent
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.03  # peak learning rate
    head_lr_scale: float = 1.0  # lr multiplier for the projection head and prototypes (new layers on a pretrained encoder)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = 5e-4  # not applied to biases, norm parameters and prototypes
    warmup_steps: int = 0  # linear warm-up of the learning rate
    schedule: Literal["cosine", "constant"] = "cosine"
    cosine_cycles: float = 0.4375  # FixMatch's 7/16: lr ends at cos(7 pi / 16) = 0.2 of its peak
    ema_decay: float = 0.999  # EMA of the weights; evaluation (dev and test accuracy) uses the EMA model
    grad_clip: float | None = None  # max gradient norm; null: no clipping
    eval_every: int = 500  # steps between evaluations (and at the end)
    log_every: int = 50  # steps between train.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: times fp32 and bf16 on the first step where bf16 is native, keeps the faster
    channels_last: bool = True  # NHWC convolution weights: faster on CPUs (fp32 and bf16) and on GPUs in bf16
    compile: bool = False  # torch.compile the encoder (a minute or more of compiling first; see docs/precision.md)
    log_with: Literal["none", "tensorboard"] = "none"
    save_embeddings: bool = True  # embeddings of 500 labeled + 500 unlabeled samples at start and end, for plots
    progress_bar: bool = True  # a tqdm bar on the main process
    shift_report: bool = True  # at the start: labeled vs unlabeled distance of the starting encoder, against shuffles

    def validate(self) -> None:
        _positive("trainer.max_steps", self.max_steps)
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"trainer.max_minutes={self.max_minutes} must be > 0")
        if self.lr <= 0:
            raise ConfigError(f"trainer.lr={self.lr} must be > 0")
        if self.head_lr_scale <= 0:
            raise ConfigError(f"trainer.head_lr_scale={self.head_lr_scale} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"trainer.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"trainer.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in [0, 1)")
        for key in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
            _positive(f"trainer.{key}", getattr(self, key))
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"trainer.grad_clip={self.grad_clip} must be > 0")
        if not 0 < self.cosine_cycles <= 0.5:  # past half a cycle the cosine is negative: gradient ascent
            raise ConfigError(f"trainer.cosine_cycles={self.cosine_cycles} must be in (0, 0.5] (0.5 decays the "
                              "learning rate to 0; FixMatch's 0.4375 to 0.2 of its peak)")
        if self.momentum < 0 or (self.optimizer == "sgd" and self.nesterov and self.momentum == 0):
            raise ConfigError(f"trainer.momentum={self.momentum} must be >= 0, and > 0 with trainer.nesterov=true "
                              "(Nesterov's update needs a momentum); set trainer.nesterov=false for plain SGD")


@dataclass
class ModalityConfig:
    """Which adapter to use and its own options (declared by the adapter's `Options` dataclass)."""

    name: str = "image"  # a registered name, or `package.module:ClassName`
    options: Any = None  # an instance of the adapter's Options dataclass


@dataclass
class Config:
    """A complete, validated run description. `config.yaml` in a run folder is this, as YAML."""

    modality: ModalityConfig = field(default_factory=ModalityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: MethodConfig = field(default_factory=lambda: MethodConfig("dmssl"))
    pseudo_label: MethodConfig = field(default_factory=lambda: MethodConfig("fixed"))
    distance: MethodConfig = field(default_factory=lambda: MethodConfig("mmd"))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    recipe: str = "custom"  # the recipe's name; used for the default output folder
    seed: int = 0  # seeds the label split, data order, views, initialisation and projections
    output_dir: str | None = None  # default: runs/<recipe>-<time>
    resume: str = "never"  # never, auto (newest readable checkpoint in output_dir), or a checkpoint file
    overwrite: bool = False  # allow reusing an output_dir that holds a different run
    plugins: list[str] = field(default_factory=list)  # modules imported first: their registered methods become names

    def validate(self) -> None:
        if not 0 <= self.seed < 2**32:  # derived seeds (seed * 1_000_003 + step) must stay inside 64 bits
            raise ConfigError(f"seed={self.seed} must be in [0, 2**32)")
        for section in (self.data, self.model, self.trainer):
            section.validate()
        for method in (self.objective, self.pseudo_label, self.distance):
            if hasattr(method.options, "validate"):
                method.options.validate()
        if self.resume not in ("never", "auto") and not Path(self.resume).is_file():
            raise ConfigError(
                f"resume={self.resume!r}: expected 'never', 'auto' or an existing checkpoint file"
            )
        options = self.modality.options
        if options is not None and hasattr(options, "validate"):
            options.validate()


SECTIONS = {"data": DataConfig, "model": ModelConfig, "trainer": TrainerConfig}
METHOD_SECTIONS = ("objective", "pseudo_label", "distance")
TOP_LEVEL = ("recipe", "seed", "output_dir", "resume", "overwrite", "plugins")


def _positive(key: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def check_finite(tree: Any, prefix: str = "") -> None:
    """Every float in a (dataclass) config must be finite: nan or inf would only fail at the first step."""
    if isinstance(tree, MethodConfig):
        check_finite(tree.options, prefix)
    elif dataclasses.is_dataclass(tree):
        for f in dataclasses.fields(tree):
            check_finite(getattr(tree, f.name), f"{prefix}{f.name}")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{prefix}={tree} must be a finite number")
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            check_finite(item, f"{prefix}[{i}]")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a config tree."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The YAML-ready form of a Config; `build_config` reads it back to an equal Config."""
    tree: dict[str, Any] = {"recipe": cfg.recipe}
    modality = {"name": cfg.modality.name}
    if cfg.modality.options is not None:
        modality.update(dataclasses.asdict(cfg.modality.options))
    tree["modality"] = modality
    for name in ("data", "model"):
        tree[name] = dataclasses.asdict(getattr(cfg, name))
    for name in METHOD_SECTIONS:
        method = getattr(cfg, name)
        tree[name] = {"name": method.name, **dataclasses.asdict(method.options)}
    tree["trainer"] = dataclasses.asdict(cfg.trainer)
    for key in TOP_LEVEL[1:]:
        tree[key] = getattr(cfg, key)
    return tree


# Names that lived here before recipe reading moved to dmssl/recipe.py; they keep working for a release.
MOVED_TO_RECIPE = ("recipe_names", "load_recipe", "parse_overrides", "apply_override", "deep_merge", "coerce",
                   "section_from_dict", "unknown_key", "method_keys", "all_keys", "method_from_dict", "build_config",
                   "import_plugins", "resolve", "resolve_pairs", "config_from_dict")


def __getattr__(name: str) -> Any:
    if name in MOVED_TO_RECIPE:
        import importlib
        import warnings

        warnings.warn(f"dmssl.config.{name} moved to dmssl.recipe.{name}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("dmssl.recipe"), name)
    raise AttributeError(f"module 'dmssl.config' has no attribute {name!r}")
