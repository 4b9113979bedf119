"""Everything a run needs to continue where it stopped: one object, saved and loaded symmetrically.

`TrainState.state_dict()` is what a checkpoint file holds; `load_state_dict()` restores it and checks
that the checkpoint belongs to this run's labeled split. The RNG state is torch's global one: the
seeded step design (dmssl/data.py) leaves only dropout and similar draws to it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from dmssl.checkpoint import ema_weights, without_copies
from dmssl.errors import CheckpointError
from dmssl.frozen_weights import frozen_record, rebuildable_names, restore_frozen


class TrainState:
    """model (unwrapped), EMA, optimizer, objective buffers (pseudo-label statistics), step, elapsed time, split."""

    def __init__(self, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, objective: nn.Module,
                 labeled_indices: list[int]) -> None:
        self.model, self.ema, self.optimizer, self.objective = model, ema, optimizer, objective
        self.labeled_indices = labeled_indices
        self.step = 0
        self.elapsed_seconds = 0.0  # training time before the last resume (each resume adds to it)
        self.precision: dict[str, Any] | None = None  # what auto chose (dmssl.precision), kept on resume
        self._frozen: dict[str, Any] | None = None  # digest of the frozen pretrained weights, computed once

    def state_dict(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        model = self.model.state_dict()
        ema = self.ema.state_dict()
        ema["module"], ema["same_as_model"] = without_copies(ema["module"], model)
        # A frozen pretrained encoder is rebuilt from its source on load, not stored (dmssl/frozen_weights.py).
        if self._frozen is None:
            names = rebuildable_names(self.model)
            self._frozen = frozen_record(self.model, names) if names else {}
        left_out = set(self._frozen.get("names", []))
        return {
            "step": self.step,
            "model": {name: value for name, value in model.items() if name not in left_out},
            "frozen": self._frozen or None,
            "ema": ema,
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": torch.get_rng_state(),
            "elapsed_seconds": self.elapsed_seconds,
            "labeled_indices": self.labeled_indices,
            "config": json.dumps(config, default=str) if config is not None else None,
            "precision": json.dumps(self.precision) if self.precision is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        if state["labeled_indices"] != self.labeled_indices:
            raise CheckpointError(f"{source}: its labeled split differs from this config's")
        state = restore_frozen(state, self.model, source)
        if state.get("frozen"):  # checked against the weights just built: the next save need not hash them again
            self._frozen = {**state["frozen"], "weights_from": str(self.model.encoder.weights_from)}
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict({**state["ema"], "module": ema_weights(state)})
            self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state.get("objective", self.objective.state_dict()))
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{source} does not fit this run's model or objective ({first}); "
                                  "pass overwrite=true to start afresh") from None
        torch.set_rng_state(state["rng"])
        self.step, self.elapsed_seconds = int(state["step"]), float(state["elapsed_seconds"])
        self.precision = json.loads(state["precision"]) if state.get("precision") else None
