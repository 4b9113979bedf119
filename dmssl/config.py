"""Configuration: one dataclass per concern, YAML recipes and `key=value` overrides mapped onto them.

Resolution order (later wins): dataclass defaults < the modality adapter's `defaults` < the recipe
< command-line overrides. Values are coerced by each field's annotation (never by guessing from the
text), so `trainer.lr=1` is a float and `5e-4` in YAML is a float too. Unknown keys, wrong types and
impossible values raise `ConfigError` with the nearest valid key or the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dmssl.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class DataConfig:
    """Where the data comes from and how batches are drawn."""

    dataset: str = "folder"  # the adapter's source: e.g. cifar10, digits, folder, imdb, files
    root: str | None = None  # a folder or a .tar.gz; the adapter documents its layout
    train_files: list[str] = field(default_factory=list)  # explicit files (text adapters)
    unlabeled_files: list[str] = field(default_factory=list)  # files of unlabeled samples (optional)
    test_files: list[str] = field(default_factory=list)  # files of the test set
    label_pattern: str | None = None  # regex whose first group is the class, on file names
    num_labels: int | None = None  # total labeled samples, balanced over classes
    labels_per_class: int | None = None  # alternative to num_labels
    batch_size: int = 64  # labeled samples per step (per process)
    mu: int = 7  # unlabeled samples per labeled sample in a step
    eval_batch_size: int = 256  # samples per evaluation batch
    num_workers: int = 2  # DataLoader workers that build whole training steps ahead of time
    test_subset: int | None = None  # evaluate on a fixed, seeded subset of the test set
    dev_size: int = 0  # labeled training samples held out (never trained on) to choose settings on; 0: none
    max_unlabeled: int | None = None  # cap on the unlabeled pool (seeded subset)
    cache_dir: str | None = None  # decoded-data cache; default ~/.cache/dmssl

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
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.dev_size < 0:
            raise ConfigError(f"data.dev_size={self.dev_size} must be >= 0")


@dataclass
class ModelConfig:
    """The encoder (built by the modality adapter) and the projection head on top of it."""

    encoder: str = "small_cnn"  # an encoder name the adapter knows
    name: str | None = None  # pretrained model: a hub name or a local folder (text encoders)
    width: int | None = None  # encoder width; None = the encoder's default
    depth: int | None = None  # encoder depth; None = the encoder's default
    pooling: Literal["mean", "cls"] = "mean"  # sequence pooling (text encoders)
    freeze_layers: int = 0  # freeze this many lower layers of a pretrained encoder
    proj_hidden_dim: int = 128
    proj_dim: int = 128  # embedding width: where prototypes, contrast and matching live

    def validate(self) -> None:
        _positive("model.width", self.width)
        _positive("model.depth", self.depth)
        _positive("model.proj_hidden_dim", self.proj_hidden_dim)
        _positive("model.proj_dim", self.proj_dim)
        if self.freeze_layers < 0:
            raise ConfigError(f"model.freeze_layers={self.freeze_layers} must be >= 0")


@dataclass
class MethodConfig:
    """A registered method (objective, distance or pseudo-labeller) and its own `Options`.

    In YAML and on the command line the options sit flat beside `name` (`objective.lambda_dm=2`);
    which keys exist is declared by the chosen class's `Options` dataclass, next to the class.
    """

    name: str
    options: Any = None


def _registries() -> dict[str, tuple[Any, str]]:
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
}


@dataclass
class TrainerConfig:
    """The loop: budget, optimiser, schedule, EMA, evaluation, checkpoints, logging."""

    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and evaluate) when this wall-clock budget is spent
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.03
    head_lr_scale: float = 1.0  # lr multiplier for the projection head and prototypes (new layers on a pretrained encoder)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    cosine_cycles: float = 0.4375  # FixMatch's 7/16: lr ends at cos(7 pi / 16) = 0.2 of its peak
    ema_decay: float = 0.999
    grad_clip: float | None = None
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a bf16 GPU or a CPU with AMX/AVX512_BF16, else fp32
    channels_last: bool = True  # NHWC convolution weights: faster on CPUs (fp32 and bf16) and on GPUs in bf16
    compile: bool = False  # torch.compile the encoder (a minute or more of compiling first; see docs/precision.md)
    log_with: Literal["none", "tensorboard"] = "none"
    save_embeddings: bool = True  # embeddings of 500 labeled + 500 unlabeled samples at start and end, for plots
    progress_bar: bool = True

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


# ---------------------------------------------------------------- recipes and overrides


def recipe_names() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe by name (a file in `recipes/`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = recipe_names()
        near = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown recipe {name_or_path!r}{hint} Recipes: {', '.join(names)} (or a path to a .yaml file)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("recipe", path.stem)
    return data


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Split `key=value` tokens on the first `=` (values may contain `=`)."""
    pairs = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {token!r} is not of the form key=value (e.g. trainer.max_steps=500)")
        pairs.append((key.strip(), value))
    return pairs


def apply_override(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `a.b.c`, creating sections as needed."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])} is a value, not a section; cannot set {dotted_key}")
        node = child
    node[leaf] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `top` over `base`, recursing into sections present in both."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- typed conversion


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value or an override string to `annotation`, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint} Allowed: {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}={value!r} is not a bool (true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an int")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not a float")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        return str(value)
    if annotation is Any:
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def section_from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the nearest valid one."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a section (a mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(f"{prefix}.{key}", [f"{prefix}.{n}" for n in names])
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    shown = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + ", ..."
    return ConfigError(f"unknown key {key!r}{hint} Valid keys: {shown}")


def method_keys(section: str) -> dict[str, list[str]]:
    """name -> the option keys of that registered method, for one method section."""
    registry, _ = _registries()[section]
    return {name: [f.name for f in dataclasses.fields(registry.get(name).Options)] for name in registry.names()}


def all_keys(options_cls: type | None = None) -> list[str]:
    """Every dotted key a recipe or override may set."""
    keys = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for section in METHOD_SECTIONS:
        keys.append(f"{section}.name")
        keys += sorted({f"{section}.{k}" for names in method_keys(section).values() for k in names})
    keys += ["modality.name"] + list(TOP_LEVEL)
    if options_cls is not None:
        keys += [f"modality.{f.name}" for f in dataclasses.fields(options_cls)]
    return keys


def method_from_dict(section: str, values: Any, explicit: set[str], valid: list[str]) -> MethodConfig:
    """`{name: dmssl, lambda_dm: 2}` -> MethodConfig("dmssl", DistributionMatching.Options(lambda_dm=2)).

    A key that another method of the section declares is dropped when it came from a recipe or defaults
    (a recipe written for dmssl still runs with objective.name=fixmatch), and refused when it was given on
    the command line (it would do nothing). A key no method declares is refused with the nearest one.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be a section (a mapping), got {values!r}")
    registry, default = _registries()[section]
    values = dict(values)
    name = coerce(values.pop("name", default), str, f"{section}.name")
    try:
        cls = registry.get(name)
    except ConfigError as err:  # the registry's message lists the registered names
        raise ConfigError(f"{section}.name={name!r}: {err}") from None
    own = {f.name for f in dataclasses.fields(cls.Options)}
    others = method_keys(section)
    kept = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key in own:
            kept[key] = value
        elif any(key in keys for keys in others.values()):
            if dotted in explicit:
                owners = ", ".join(n for n, keys in others.items() if key in keys)
                raise ConfigError(f"{dotted} is an option of {section}.name={owners}, not of {section}.name={name}; "
                                  f"options of {name}: {', '.join(sorted(own)) or 'none'}")
        else:
            raise unknown_key(dotted, valid)
    return MethodConfig(name=name, options=section_from_dict(cls.Options, kept, section))


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


def build_config(tree: dict[str, Any], options_cls: type | None, explicit: set[str] | None = None) -> Config:
    """Turn a merged dict (recipe + overrides + defaults) into a validated `Config`.

    `explicit`: the dotted keys given on the command line (stricter about keys of another method).
    """
    explicit = explicit or set()
    for key, value in flatten_tree(tree).items():
        if key in MOVED_KEYS:
            raise ConfigError(f"{key} was renamed: use {MOVED_KEYS[key]}={value}")
    valid = all_keys(options_cls)
    known = set(SECTIONS) | set(METHOD_SECTIONS) | {"modality"} | set(TOP_LEVEL)
    for key in tree:
        if key not in known:
            raise unknown_key(key, valid)
    sections = {name: section_from_dict(cls, tree.get(name) or {}, name) for name, cls in SECTIONS.items()}
    methods = {name: method_from_dict(name, tree.get(name) or {}, explicit, valid) for name in METHOD_SECTIONS}
    modality_tree = dict(tree.get("modality") or {})
    name = coerce(modality_tree.pop("name", "image"), str, "modality.name")
    options = section_from_dict(options_cls, modality_tree, "modality") if options_cls else None
    if options_cls is None and modality_tree:
        raise unknown_key(f"modality.{next(iter(modality_tree))}", valid)
    top = {k: coerce(tree[k], typing.get_type_hints(Config)[k], k) for k in TOP_LEVEL if k in tree}
    cfg = Config(modality=ModalityConfig(name=name, options=options), **sections, **methods, **top)
    for section in ("data", "model", "trainer", *METHOD_SECTIONS):
        check_finite(getattr(cfg, section), f"{section}.")
    check_finite(options, "modality.")
    cfg.validate()
    return cfg


def flatten_tree(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_tree(value, f"{prefix}{key}."))
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


def import_plugins(modules: list[str]) -> None:
    """Import each module (once): a module that registers an objective, distance or pseudo-labeller makes
    its name valid in this config (`plugins=[mypkg.losses]`)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {module!r} ({err}); is it on PYTHONPATH or installed "
                              "(pip install -e your package)?") from None


def resolve(tokens: list[str]) -> Config:
    """Parse `recipe=NAME key=value ...` into a Config (adapter defaults applied)."""
    from dmssl.registry import load_modality  # late import: the registry imports adapters lazily

    pairs = parse_overrides(tokens)
    explicit = {k for k, _ in pairs}
    recipes = [v for k, v in pairs if k == "recipe"]
    tree: dict[str, Any] = load_recipe(recipes[-1]) if recipes else {"recipe": "custom"}
    for key, value in pairs:
        if key != "recipe":
            apply_override(tree, key, value)
    import_plugins(coerce(tree.get("plugins", []), list[str], "plugins"))
    modality_name = str((tree.get("modality") or {}).get("name", "image"))
    adapter_cls = load_modality(modality_name)
    tree = deep_merge(getattr(adapter_cls, "defaults", {}) or {}, tree)
    return build_config(tree, getattr(adapter_cls, "Options", None), explicit)
