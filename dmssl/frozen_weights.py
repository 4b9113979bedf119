"""A frozen pretrained encoder's weights are not stored in checkpoints: they are rebuilt from where they came from.

A run that freezes a pretrained encoder (`model.freeze=all`, or its lower N blocks) trains only what sits on top;
storing the encoder's hundreds of MiB in each checkpoint of each run made a study of many runs fill a disk. A
checkpoint of such a run leaves those entries out and records them instead:

    state["frozen"] = {"names": [...], "digest": sha1 of their names, dtypes, shapes and bytes,
                       "weights_from": the pretrained name or folder they were loaded from}

Whoever reads the checkpoint (a resume, `dmssl.load`, `dmssl predict`, `dmssl export`) builds the model from the
run's config, as training did, which loads the same pretrained weights; `restore_frozen` checks the digest and
puts the entries back. A pretrained model that has changed or moved since is an error that says so, never a
silently different model. An export (`dmssl export`) stores every weight, so it stands alone.

Which encoders qualify: those that say where their weights came from (`weights_from`, a non-empty string:
the timm, Whisper, speech and text encoders); a frozen encoder with random weights is stored as before, since
building it again would not give the same weights.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from dmssl.errors import CheckpointError


def rebuildable_names(model: nn.Module) -> list[str]:
    """State-dict names of `model.encoder`'s frozen parameters, where the encoder was loaded from pretrained weights."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not getattr(encoder, "weights_from", None):
        return []
    return sorted(f"encoder.{name}" for name, param in encoder.named_parameters() if not param.requires_grad)


def tensors_digest(entries: dict[str, torch.Tensor], names: list[str]) -> str:
    digest = hashlib.sha1()
    for name in names:
        tensor = entries[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_record(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """What a checkpoint keeps in place of the entries `names` (see the module docstring)."""
    return {"names": names, "digest": tensors_digest(model.state_dict(), names),
            "weights_from": str(model.encoder.weights_from)}  # type: ignore[union-attr]


def restore_frozen(state: dict[str, Any], model: nn.Module, source: str = "checkpoint") -> dict[str, Any]:
    """`state` with the frozen entries it left out taken from `model` (built from the run's config), after checking
    that they are the weights the run was trained with. A checkpoint that stores every entry is returned as is."""
    record = state.get("frozen")
    if not record:
        return state
    names = list(record["names"])
    entries = model.state_dict()
    missing = [name for name in names if name not in entries]
    if missing:
        raise CheckpointError(f"{source} leaves out frozen encoder weights that this run's model does not have "
                              f"({missing[:3]}): build it with the config the run was trained with")
    found = tensors_digest(entries, names)
    if found != record["digest"]:
        raise CheckpointError(
            f"{source} does not store its frozen encoder's weights: they are rebuilt from the pretrained model "
            f"{record['weights_from']!r}, but the encoder built now has other weights (digest {found[:12]}, the run's "
            f"{record['digest'][:12]}); point modality.pretrained at the model the run was trained with")
    return {**state, "model": {**state["model"], **{name: entries[name] for name in names}}}
