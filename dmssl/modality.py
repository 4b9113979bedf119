"""The modality adapter contract: everything dmssl needs to know about one kind of data.

An adapter supplies raw data, per-sample views, a collate function and an encoder. Everything else
(labeled/unlabeled split, step assembly, pseudo-labels, losses, distances, devices, checkpoints,
logging) belongs to the core, which never branches on the modality.

A new modality is one file:

    @dataclass
    class SensorOptions:            # keys under `modality:` in a recipe
        window: int = 128

    class SensorModality(Modality):
        Options = SensorOptions
        defaults = {"distance": {"kernel": "gaussian"}}   # recipe defaults this data wants
        def load(self): ...             -> RawData
        def weak(self, sample): ...     -> a lightly augmented copy
        def strong(self, sample): ...   -> a heavily augmented copy
        def collate(self, views): ...   -> Tensor or dict of Tensors, batch first
        def build_encoder(self): ...    -> nn.Module with `feature_dim`, (batch) -> (B, feature_dim)
        # optional: weak_views(samples) / strong_views(samples), vectorised views of many samples
        # optional, for predicting with a trained model: samples_from(values), read_inputs(path),
        #   inference_state() / restore_inference_state(state), export_encoder(encoder, folder),
        #   use_exported_encoder(folder)

and runs with `python train.py recipe=my.yaml modality.name=my_package.sensor:SensorModality`.
`dmssl.testing.check_adapter` tells an author what their adapter gets wrong.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dmssl.config import Config, DataConfig, ModelConfig
from dmssl.errors import ConfigError, DataError
from dmssl.registry import unknown_name_message

Batch = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class RawData:
    """Raw samples as the adapter loaded them, before any split or view.

    Attributes:
        train: training samples (any Python objects the views understand).
        train_labels: class index per training sample, or -1 where the label is unknown.
        test: test samples.
        test_labels: class index per test sample (all known).
        class_names: one name per class; `len(class_names)` is the number of classes.
        unlabeled: extra samples with no label at all (e.g. IMDB's 50k `unsup` reviews).
        train_groups, test_groups: optional group name per sample (e.g. the speaker of a clip), for
            `data.labeled_groups` / `data.target_groups`: labeled data from some groups, the rest from others.
    """

    train: Sequence[Any]
    train_labels: list[int]
    test: Sequence[Any]
    test_labels: list[int]
    class_names: list[str]
    unlabeled: Sequence[Any] = field(default_factory=list)
    train_groups: list[str] | None = None
    test_groups: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Modality(ABC):
    """Base class of modality adapters.

    Views (`weak`, `strong`, `test_view`) run in DataLoader workers, one sample at a time (or a
    step's samples at once through `weak_views` / `strong_views`, where an adapter vectorises), and must
    draw their randomness from torch's global RNG (or Python's `random`): the core seeds both before
    building each training step, which makes views reproducible and runs resumable. A view must keep
    the label of its sample. `collate` receives every view of a training step at once (labeled and
    unlabeled together), so that variable-length data is padded to one length and the encoder runs
    one forward pass, with BatchNorm statistics over the whole step.

    Class attributes:
        Options: a dataclass of this adapter's recipe keys (the `modality:` section), or None.
        defaults: recipe values this modality recommends, e.g. its MMD kernel
            (`{"distance": {"kernel": "imq"}}`); a recipe or an override still wins.
        encoders: the `model.encoder` names `build_encoder` accepts; a config naming another one is
            refused before any data is read. None: not checked until `build_encoder`.
        renamed_keys: keys this adapter used to read elsewhere, old -> new (exit 2 names the new one).
    """

    Options: ClassVar[type | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    encoders: ClassVar[tuple[str, ...] | None] = None
    renamed_keys: ClassVar[dict[str, str]] = {}  # old key -> new key: an old recipe stops with the new name
    input_suffixes: ClassVar[tuple[str, ...]] = ()  # files `read_inputs` takes when a folder is given to predict

    def __init__(self, options: Any, data: DataConfig, model: ModelConfig) -> None:
        self.options = options
        self.data = data
        self.model = model

    @abstractmethod
    def load(self) -> RawData:
        """Read the data named by `self.data` (raise `DataError` with what to do when it is missing)."""

    @abstractmethod
    def weak(self, sample: Any) -> Any:
        """A lightly augmented view of one sample (FixMatch's flip-and-crop for images)."""

    @abstractmethod
    def strong(self, sample: Any) -> Any:
        """A heavily augmented view of one sample (RandAugment-like)."""

    def weak_views(self, samples: Sequence[Any]) -> list[Any]:
        """Weak views of many samples, in order; the core builds every training step with this.

        The default calls `weak` once per sample. Override it where a batch of samples can be
        augmented in a few vectorised ops (the image adapter does: per-image transforms on small
        images cost more in Python overhead than in arithmetic). An override must draw the same
        kind of views, from the same global RNGs, as `weak` does.
        """
        return [self.weak(sample) for sample in samples]

    def strong_views(self, samples: Sequence[Any]) -> list[Any]:
        """Strong views of many samples, in order; see `weak_views`."""
        return [self.strong(sample) for sample in samples]

    def test_view(self, sample: Any) -> Any:
        """The view used for evaluation; no randomness."""
        return sample

    @abstractmethod
    def collate(self, views: list[Any]) -> Batch:
        """Stack views into one batch: a tensor or a dict of tensors, batch dimension first."""

    @abstractmethod
    def build_encoder(self) -> nn.Module:
        """The encoder: `forward(batch) -> (B, feature_dim)`; it exposes `feature_dim: int`."""

    # ---------------------------------------------------------------- using a trained model

    def inference_state(self) -> dict[str, Any]:
        """What `load` learned that `build_encoder`, `test_view` or `samples_from` need (JSON-ready, e.g. the
        number of image channels). It is saved beside the weights, so that a trained model classifies new
        samples without reading its training data again."""
        return {}

    def restore_inference_state(self, state: dict[str, Any]) -> None:
        """Undo `inference_state`: called instead of `load` when a trained model is loaded."""
        return None  # an adapter whose load learns nothing has nothing to restore

    def split_batch(self, values: Any) -> list[Any]:
        """The samples of what a user hands to `Classifier.predict`: a list as it is, an array or tensor by its
        first axis, a single string as one text. Override to refuse a shape that is one sample, not a batch."""
        if isinstance(values, (str, bytes)):
            return [values]
        try:
            return list(values)
        except TypeError:
            raise DataError(f"expected a batch of samples (a list, an array or a tensor); got {type(values).__name__}") from None

    def samples_from(self, values: Sequence[Any]) -> list[Any]:
        """Samples from the raw values a user hands to `Classifier.predict` (arrays, strings, waveforms).

        The default takes them as samples already. Raise `DataError` naming what is wrong with a value.
        """
        return list(values)

    def read_inputs(self, path: Path) -> list[Any]:
        """The samples in one input file of `dmssl predict` (an image, a text file of lines, an audio clip).

        Raise `DataError` for an unreadable or empty file; adapters that read no files keep this default.
        """
        raise DataError(f"{path}: modality {type(self).__name__} reads no input files (it defines no read_inputs)")

    def export_encoder(self, encoder: nn.Module, folder: Path) -> bool:
        """Write the encoder in its own ecosystem's format into `folder` (text: `save_pretrained`); True if written.

        An export holds the weights as safetensors either way; this is for tools outside dmssl.
        """
        return False

    def use_exported_encoder(self, folder: Path) -> None:
        """Loading an export that holds `folder` (written by `export_encoder`): build the encoder from it, so
        that the export needs nothing else (text: the tokenizer and architecture come from the folder)."""
        return None  # adapters without an exported encoder rebuild it from the config


def check_pattern(key: str, value: str | None, captures: str | None = None, example: str | None = None) -> None:
    """A `modality.<key>` regex option: it must compile, and where `captures` says what its first group holds
    (a class, a group name), it must have one. Adapters call it from their options' `validate`."""
    if value is None:
        return
    try:
        compiled = re.compile(value)
    except re.error as err:
        raise ConfigError(f"modality.{key}={value!r} is not a regex: {err}") from None
    if captures and compiled.groups < 1:
        raise ConfigError(f"modality.{key}={value!r} has no group: its first group must capture {captures}, e.g. {example}")


def group_of(pattern: re.Pattern[str], text: str) -> str:
    """The first group of `modality.group_pattern` on a file's name or path; a file without one is an error
    (when groups are asked for, every sample must land on a side)."""
    found = pattern.search(text)
    if not found or found.group(1) is None:
        raise DataError(f"{text} does not match modality.group_pattern={pattern.pattern!r}; every file needs a group "
                        "when groups are asked for")
    return found.group(1)


# ---------------------------------------------------------------- finding and building adapters

ENTRY_POINT_GROUP = "dmssl.modalities"


def modality_names() -> list[str]:
    """Names registered in the `dmssl.modalities` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_modality(reference: str) -> type:
    """Resolve `image` (entry point) or `pkg.module:Class` to an adapter class."""
    if ":" in reference:
        module_name, _, class_name = reference.partition(":")
        if not (re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name) and class_name.isidentifier()):
            raise ConfigError(f"modality.name={reference!r} is not package.module:ClassName (nor a registered name: "
                              f"{', '.join(modality_names())})")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"modality={reference!r}: cannot import module {module_name!r} ({err}); run from the "
                              "folder that holds it, add that folder to PYTHONPATH, or pip install -e the package "
                              "(which may also register a short name in the dmssl.modalities entry-point group)") from None
        except Exception as err:  # the module's own code failed
            raise ConfigError(f"modality={reference!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
        if not hasattr(module, class_name):
            raise ConfigError(f"modality={reference!r}: module {module_name!r} has no attribute {class_name!r}")
        adapter = getattr(module, class_name)
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == reference]
        if not matches:
            names = modality_names()
            raise ConfigError(
                unknown_name_message("modality", reference, names)
                + " (or give package.module:ClassName; is the package installed with pip install -e .?)"
            )
        try:
            adapter = matches[0].load()
        except ImportError as err:
            raise ConfigError(f"modality {reference!r} failed to import: {err}") from None
    if not (inspect.isclass(adapter) and issubclass(adapter, Modality)):
        raise ConfigError(
            f"modality={reference!r} is not an adapter: expected a subclass of dmssl.modality.Modality,"
            f" got {adapter!r}"
        )
    return adapter


def build_adapter(cfg: Config) -> Modality:
    """The run's adapter, built from its config: the one place adapters are made."""
    return load_modality(cfg.modality.name)(cfg.modality.options, cfg.data, cfg.model)
