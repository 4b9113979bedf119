"""Freezing a pretrained encoder: `model.freeze`, one meaning for every modality.

    model.freeze: none    every encoder parameter trains (full fine-tuning; what a GPU affords)
    model.freeze: all     no encoder parameter trains: only the projection head, the prototypes and (for
                          FixMatch) the linear classifier do; the encoder's outputs can then be cached
                          (dmssl/feature_cache.py), which makes CPU training a matter of minutes
    model.freeze: N       the encoder's lower N blocks are frozen, the rest train

What a block is, the encoder says: an encoder that can be frozen in part exposes `freeze_units()`, its
blocks from the input up (for a Transformer: the embeddings then each layer; for a CNN: the stem then each
stage). An encoder without it can be frozen whole or not at all. A frozen part stays in eval mode during
training (its batch-norm statistics and dropout as pretrained), whatever `model.train()` asks.

A frozen prefix can be cached as a frozen encoder's outputs are (dmssl/feature_cache.py) where the encoder
can run in two parts: it exposes `encode_prefix(batch, n)`, the output of its lower n blocks (one fixed shape
per sample), and `encode_from(hidden, n)`, the rest of the forward pass, with
`encode_from(encode_prefix(batch, n), n) == forward(batch)`. With `model.freeze=N` and `model.cached_views` > 0,
the cache then holds the prefix's outputs of every view and each step trains the top blocks on them; an
encoder without the pair, or whose blocks the pair cannot split at N (`can_start_from(n)` is false), trains
the whole forward pass at every step, as before. Which encoders have it: docs/pretrained.md.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmssl.errors import ConfigError


def local_files_only(name: str) -> bool:
    """`local_files_only` for a model library's `from_pretrained(name)`: a local folder, or `HF_HUB_OFFLINE`,
    must not wait on a hub that cannot answer."""
    return Path(name).is_dir() or bool(os.environ.get("HF_HUB_OFFLINE"))


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def keep_in_eval(module: nn.Module) -> None:
    """`module.train(True)` leaves this module (and everything under it) in eval mode."""
    module.eval()
    module.train = types.MethodType(_stay_in_eval, module)  # type: ignore[method-assign]


def freeze_units(encoder: nn.Module) -> list[nn.Module] | None:
    """The encoder's blocks, input first, where it declares them (`freeze_units()`), else None."""
    declare = getattr(encoder, "freeze_units", None)
    return list(declare()) if callable(declare) else None


def apply_freeze(encoder: nn.Module, freeze: int | str) -> str:
    """Freeze `encoder` as `model.freeze` says; returns a one-line description for the run's log."""
    if freeze in ("none", 0):
        return "encoder: every parameter trains"
    if freeze == "all":
        encoder.requires_grad_(False)
        keep_in_eval(encoder)
        return f"encoder: frozen ({count(encoder):,} parameters); the head trains"
    units = freeze_units(encoder)
    if units is None:
        raise ConfigError(f"model.freeze={freeze}: this encoder ({type(encoder).__name__}) declares no blocks to "
                          "freeze in part; allowed: none, all")
    if not isinstance(freeze, int) or freeze < 0:
        raise ConfigError(f"model.freeze={freeze!r}; allowed: none, all, or a number of blocks 0..{len(units)}")
    if freeze > len(units):
        raise ConfigError(f"model.freeze={freeze} is deeper than the encoder's {len(units)} blocks "
                          f"({type(encoder).__name__}); allowed: none, all, or 0..{len(units)}")
    for unit in units[:freeze]:
        unit.requires_grad_(False)
        keep_in_eval(unit)
    frozen = sum(count(u) for u in units[:freeze])
    return f"encoder: lower {freeze} of {len(units)} blocks frozen ({frozen:,} of {count(encoder):,} parameters)"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_fully_frozen(encoder: Any) -> bool:
    return not any(p.requires_grad for p in encoder.parameters())


def with_mask_channel(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) hidden states and their (B, T, 1) mask of real frames or tokens as one (B, T, d + 1) tensor.

    A sequence encoder's prefix output must be one tensor of one shape per sample (a cache row), and its upper
    blocks and pooling still need to know which positions are padding: the mask travels as a last channel of
    0s and 1s, exact in every float format the cache uses."""
    return torch.cat([hidden, mask.to(hidden.dtype).reshape(*hidden.shape[:2], 1)], dim=-1)


def split_mask_channel(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `with_mask_channel`: (hidden states (B, T, d), mask (B, T, 1) of bools)."""
    return packed[..., :-1], packed[..., -1:] > 0.5


def cached_prefix_blocks(encoder: Any, freeze: int | str) -> int | None:
    """What a feature cache can hold for this encoder under `model.freeze`: 0 for the whole (frozen) encoder's
    outputs, N for its lower N frozen blocks' (`encode_prefix` / `encode_from`), None for nothing."""
    if is_fully_frozen(encoder):
        return 0
    if not isinstance(freeze, int) or freeze < 1:
        return None
    can_start_from = getattr(encoder, "can_start_from", None)
    if not (callable(getattr(encoder, "encode_prefix", None)) and callable(can_start_from) and can_start_from(freeze)):
        return None
    return freeze
