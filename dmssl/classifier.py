"""A trained model, for new samples: `dmssl.load(RUN_DIR or EXPORT_DIR) -> Classifier`.

    clf = dmssl.load("runs/quickstart")
    clf.predict(images)          # (N,) class indices; clf.class_names[i] names them
    clf.predict_proba(images)    # (N, K) probabilities
    clf.embed(images)            # (N, d) unit embeddings (or encoder features with space="features")

Samples are raw values in the adapter's native form (image arrays, strings, waveforms); the adapter turns
them into samples (`samples_from`) and applies its test view, exactly as evaluation does. The weights are
the EMA model's, the ones every reported accuracy was measured with. A run folder is read from its newest
readable checkpoint; an export (`dmssl export`) from its safetensors file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import send_to_device

from dmssl.checkpoint import ema_weights, load_latest_valid
from dmssl.config import Config
from dmssl.errors import CheckpointError, ConfigError
from dmssl.frozen_weights import restore_frozen
from dmssl.modality import Modality, build_adapter
from dmssl.model import SSLModel
from dmssl.trust import TrustPlugins, check_not_on_import_path

MODEL_FILE = "model.json"  # class names and the adapter's inference state: in run folders and exports
WEIGHTS_FILE = "model.safetensors"  # exports only
ENCODER_FOLDER = "encoder"  # exports only, where the adapter writes its encoder in its ecosystem's format


def write_model_description(folder: Path, class_names: list[str], adapter: Modality, **extra: Any) -> None:
    """What a trained model needs beside its weights and config to classify new samples."""
    description = {"class_names": list(class_names), "adapter_state": adapter.inference_state(), **extra}
    (folder / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


class Classifier:
    """A trained model with its adapter: raw samples in, classes, probabilities or embeddings out."""

    def __init__(self, model: SSLModel, adapter: Modality, class_names: list[str], config: Config,
                 device: torch.device | str | None = None, batch_size: int = 64, source: str = "") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.adapter, self.class_names, self.config = adapter, list(class_names), config
        self.temperature = float(getattr(config.objective.options, "temperature", 0.1))
        self.batch_size, self.source = batch_size, source

    def __repr__(self) -> str:
        return (f"Classifier({self.source!r}, modality={self.config.modality.name!r}, "
                f"objective={self.config.objective.name!r}, classes={self.class_names})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict(self, samples: Any) -> np.ndarray:
        """(N,) predicted class indices of raw samples (`class_names[i]` is the name)."""
        return self.predict_proba(samples).argmax(axis=1)

    def predict_proba(self, samples: Any) -> np.ndarray:
        """(N, K) class probabilities: the softmax of the logits the model was trained with."""
        return self.proba_of_samples(self.adapter.samples_from(self.adapter.split_batch(samples)))

    def embed(self, samples: Any, space: str = "projection") -> np.ndarray:
        """(N, d) embeddings: `projection` (unit-norm, the space of the losses and the matching term) or
        `features` (the encoder's output, before the projection head)."""
        if space not in ("projection", "features"):
            raise ValueError(f"space={space!r}; allowed: projection, features")
        parts = []
        with torch.no_grad():
            for batch in self.batches(self.adapter.samples_from(self.adapter.split_batch(samples))):
                out = self.model.encoder(batch) if space == "features" else self.model(batch)
                parts.append(out.float().cpu())
        return torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)

    def proba_of_samples(self, prepared: Sequence[Any]) -> np.ndarray:
        """Probabilities of samples already in the adapter's form (as `samples_from` or `read_inputs` give)."""
        parts = []
        with torch.no_grad():
            for batch in self.batches(prepared):
                _, logits = self.model.class_logits(batch, self.temperature)
                parts.append(logits.float().softmax(dim=1).cpu())
        return torch.cat(parts).numpy() if parts else np.zeros((0, self.num_classes), dtype=np.float32)

    def batches(self, prepared: Sequence[Any]) -> Iterator[Any]:
        for start in range(0, len(prepared), self.batch_size):
            views = [self.adapter.test_view(s) for s in prepared[start: start + self.batch_size]]
            yield send_to_device(self.adapter.collate(views), self.device)


def read_run_config(folder: Path, trust_plugins: TrustPlugins = False) -> Config:
    """The resolved config a run folder or an export holds (config.yaml); the modules it names are imported
    only as `trust_plugins` allows (dmssl/trust.py)."""
    from dmssl.recipe import config_from_dict

    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a dmssl run folder or export: it has no config.yaml")
    try:
        tree = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{config_file} is not valid YAML text ({type(err).__name__}: {str(err)[:200]})") from None
    try:
        return config_from_dict(tree or {}, trust_plugins, source=str(config_file))
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: {err}") from None


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder or an export; a broken or foreign file is a CheckpointError naming it."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{path} does not hold a JSON object (it holds a {type(found).__name__})")
    return found


def load(path: str | Path, device: torch.device | str | None = None, batch_size: int = 64,
         trust_plugins: TrustPlugins = False) -> Classifier:
    """A run folder (config.yaml, checkpoints/) or an export (dmssl export) as a `Classifier`.

    Loading imports no module the folder's config names (`plugins`, a `module:Class` adapter) unless
    `trust_plugins` is True or lists it, or it is already imported: see dmssl/trust.py."""
    from dmssl.objective import OBJECTIVES

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a dmssl run folder or export: no such folder")
    check_not_on_import_path(folder)
    cfg = read_run_config(folder, trust_plugins)
    weights, step, frozen = read_weights(folder)
    adapter = build_adapter(cfg)
    description_file = folder / MODEL_FILE
    if description_file.is_file():
        description = read_json_file(description_file)
        class_names = description.get("class_names")
        if not (isinstance(class_names, list) and class_names and all(isinstance(c, str) for c in class_names)):
            raise CheckpointError(f"{description_file} names no classes (class_names must be a list of strings)")
        adapter.restore_inference_state(description.get("adapter_state") or {})
    else:  # a run folder written before model.json existed: read the data once for what it says
        raw = adapter.load()
        class_names = list(raw.class_names)
    if (folder / ENCODER_FOLDER).is_dir():
        adapter.use_exported_encoder(folder / ENCODER_FOLDER)
    model = SSLModel(adapter.build_encoder(), len(class_names), cfg.model.proj_hidden_dim, cfg.model.proj_dim,
                     linear_head=OBJECTIVES.get(cfg.objective.name).head == "linear")
    try:
        model.load_state_dict(restore_frozen({"model": weights, "frozen": frozen}, model, f"{folder}")["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"the weights in {str(folder)!r} do not fit the model its config.yaml describes ({first})") from None
    source = f"{folder} (step {step})" if step is not None else str(folder)
    return Classifier(model, adapter, class_names, cfg, device, batch_size, source)


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], int | None, dict[str, Any] | None]:
    """The EMA model's weights, the step and what they leave out (a frozen pretrained encoder's weights, rebuilt
    from its source: dmssl/frozen_weights.py): an export's safetensors file (every weight), or a run folder's
    newest readable checkpoint."""
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(folder / WEIGHTS_FILE), None, None
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{folder / WEIGHTS_FILE} cannot be read ({err})") from None
    found = load_latest_valid(folder / "checkpoints", move_corrupt=False)
    if found is None:
        raise CheckpointError(f"{str(folder)!r} has no readable checkpoint in checkpoints/ (nor {WEIGHTS_FILE}): "
                              "train the run (or resume it with resume=auto) until it saves one")
    path, state = found
    ema = state.get("ema")
    if not isinstance(ema, dict) or "module" not in ema:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA model")
    return ema_weights(state), int(state["step"]), state.get("frozen")
