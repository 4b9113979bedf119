"""Checkpoints: one file per save, written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings and lists (model, EMA, optimizer, RNG state,
step, elapsed time). It is written to a temporary file in the same folder, flushed to disk, then
renamed over the final name, so a kill at any moment leaves either the old file or the new one,
never half of one; a killed writer's temporary file is removed by the next save. Loading uses
`torch.load(weights_only=True)`, which refuses pickled code. A checkpoint that cannot be read is renamed
`step_XXXXXXXX.pt.corrupt` (kept for inspection, never counted or loaded again) with a warning.

The EMA model's entries that equal the model's (a frozen encoder: every one of its weights; buffers, which
the EMA copies) are stored once, under "model", and named in `ema["same_as_model"]`: a frozen pretrained
encoder no longer doubles each checkpoint's size. `ema_weights(state)` puts them back. A frozen *pretrained*
encoder's weights are not stored at all: they are rebuilt from the pretrained model on load and checked against a
digest (dmssl/frozen_weights.py).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from dmssl.errors import CheckpointError
from dmssl.files import temporary_file

NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temporary_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as err:  # a full disk reaches torch.save as "unexpected pos ..."
        Path(tmp_name).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        cause = "the disk is full" if free < 64 * 2**20 else f"{type(err).__name__}: {str(err)[:200]}"
        raise CheckpointError(f"checkpoint {str(path)!r} could not be written ({cause}); the previous checkpoints "
                              "are kept: free space (or pass another output_dir) and resume with resume=auto") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def without_copies(entries: dict[str, Any], reference: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`entries` less those exactly equal (dtype, shape, values) to `reference`'s of the same name, and their names."""
    same = [name for name, value in entries.items()
            if isinstance(value, torch.Tensor) and isinstance(reference.get(name), torch.Tensor)
            and value.dtype == reference[name].dtype and value.shape == reference[name].shape
            and torch.equal(value, reference[name])]
    left_out = set(same)
    return {name: value for name, value in entries.items() if name not in left_out}, same


def ema_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The EMA model's whole state dict from a checkpoint: its own entries and those it shares with the model.
    Shared entries of a frozen pretrained encoder that `restore_frozen` has not put back yet are left to it
    (dmssl/frozen_weights.py)."""
    ema = state["ema"]
    rebuilt = set((state.get("frozen") or {}).get("names", []))
    shared = [name for name in ema.get("same_as_model") or [] if name in state["model"] or name not in rebuilt]
    missing = [name for name in shared if name not in state["model"]]
    if missing:
        raise CheckpointError(f"the checkpoint's EMA refers to model entries it does not hold: {missing[:3]}")
    return {**ema["module"], **{name: state["model"][name] for name in shared}}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated, corrupt or unsafe file raises CheckpointError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files; all mean the same here
        first = (str(err).strip().splitlines() or [""])[0][:200]  # torch's messages run to paragraphs
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a dmssl checkpoint (no step/model entries)")
    return state


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def set_aside(path: Path, err: CheckpointError) -> None:
    """Rename an unreadable checkpoint out of the step sequence, with a warning that says where it went."""
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
        where = f"moved to {aside.name}"
    except OSError:
        where = "could not be moved aside"
    warnings.warn(f"{err}; {where}, falling back to the previous checkpoint", stacklevel=3)


def load_latest_valid(folder: Path, move_corrupt: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt newer ones are set aside (`set_aside`), or, by a reader that
    must not change the folder (`move_corrupt=False`: predicting, exporting), skipped with a warning."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            if move_corrupt:
                set_aside(path, err)
            else:
                warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
    return None


def is_readable(path: Path) -> bool:
    """A cheap whole-file check (every member's CRC of torch's zip format), without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def prune_checkpoints(folder: Path, keep: int, newest: Path | None = None) -> None:
    """Keep the newest `keep` readable checkpoints and delete older ones; an unreadable one is set aside, not
    counted (`newest`, just written and known good, is not read again)."""
    kept = 0
    for path in reversed(list_checkpoints(folder)):
        if kept >= keep:
            path.unlink(missing_ok=True)
        elif path == newest or is_readable(path):
            kept += 1
        else:
            set_aside(path, CheckpointError(f"checkpoint {str(path)!r} cannot be read"))
