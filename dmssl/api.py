"""Training from Python: `dmssl.fit(recipe, **overrides) -> Run`, the same resolution and checks as the command line.

    run = dmssl.fit("quickstart", trainer__max_steps=300, seed=1)       # section__key=value
    run = dmssl.fit("quickstart", {"trainer.max_steps": 300})           # or dotted keys in a dict
    run.test_accuracy, run.run_dir
    clf = run.load()                                                    # a Classifier (dmssl.load(run.run_dir))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmssl.classifier import Classifier, load, read_run_config
from dmssl.config import Config


@dataclass
class Run:
    """A finished run: its folder, its resolved config and its summary (what summary.json holds)."""

    run_dir: Path
    config: Config
    summary: dict[str, Any]

    @property
    def test_accuracy(self) -> float:
        return float(self.summary["test_accuracy"])

    @property
    def dev_accuracy(self) -> float | None:
        return self.summary.get("dev_accuracy")

    def load(self, device: str | None = None) -> Classifier:
        """The trained model (EMA weights of the last checkpoint) for new samples."""
        return load(self.run_dir, device=device)

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> Run:
        """A finished run folder, read back."""
        folder = Path(run_dir)
        return cls(folder, read_run_config(folder), json.loads((folder / "summary.json").read_text(encoding="utf-8")))


def override_pairs(overrides: dict[str, Any] | None, keywords: dict[str, Any]) -> list[tuple[str, Any]]:
    """{"trainer.max_steps": 5} and trainer__max_steps=5 both become ("trainer.max_steps", 5)."""
    pairs = [(str(k), v) for k, v in (overrides or {}).items()]
    pairs += [(k.replace("__", "."), v) for k, v in keywords.items()]
    return pairs


def resolve_config(recipe: str | None = None, overrides: dict[str, Any] | None = None, **keywords: Any) -> Config:
    """The Config `fit` would train with, without training (for checking or printing it)."""
    from dmssl.recipe import resolve_pairs

    pairs = override_pairs(overrides, keywords)
    return resolve_pairs(([("recipe", recipe)] if recipe else []) + pairs)


def fit(recipe: str | None = None, overrides: dict[str, Any] | None = None, **keywords: Any) -> Run:
    """Train `recipe` (a name in recipes/ or a YAML path) with overrides; returns the finished `Run`.

    Keyword overrides use `__` for the dot (`trainer__max_steps=500`, `distance__name="wasserstein"`); dotted
    keys go in `overrides`. Mistakes raise `dmssl.ConfigError` / `DataError` with the command line's messages.
    """
    from dmssl.trainer import fit as train

    cfg = resolve_config(recipe, overrides, **keywords)
    summary = train(cfg)
    return Run(Path(summary["run_dir"]), cfg, summary)
