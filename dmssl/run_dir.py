"""The run folder: what makes a run itself, the folder's checks, its JSON-line logs and embedding snapshots.

    RUN_DIR/config.yaml       the resolved config (a resumed run must match it, up to RESUMABLE_CHANGES)
    RUN_DIR/model.json        class names and the adapter's inference state (dmssl.load reads it)
    RUN_DIR/metrics.jsonl     one line per evaluation (dev and test accuracy, the last training averages)
    RUN_DIR/train.jsonl       one line per log interval
    RUN_DIR/checkpoints/      step_XXXXXXXX.pt, written atomically (dmssl/checkpoint.py)
    RUN_DIR/embeddings/       a fixed sample's embeddings at the start and the end, for plots
    RUN_DIR/confusion_matrix.json  test counts per (true, predicted) class with the derived metrics
    RUN_DIR/summary.json      written last
    RUN_DIR/.lock             held by the process that trains in the folder (`RunLock`)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import send_to_device

from dmssl.checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint
from dmssl.config import Config, config_to_dict, flatten
from dmssl.data import seeded_subset
from dmssl.errors import CheckpointError, RunFolderBusy
from dmssl.model import SSLModel
from dmssl.train_state import TrainState

# Keys that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {"trainer.max_steps", "trainer.max_minutes", "trainer.eval_every", "trainer.log_every",
                     "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.progress_bar",
                     "trainer.log_with", "trainer.save_embeddings", "data.num_workers", "data.eval_batch_size", "data.cache_dir",
                     "output_dir", "resume", "overwrite"}


def run_identity(cfg: Config) -> dict[str, Any]:
    """The settings that make a run this run (what may not change on resume)."""
    return {k: v for k, v in flatten(config_to_dict(cfg)).items() if k not in RESUMABLE_CHANGES}


def code_version() -> str:
    """The commit of the checkout this package runs from (`+dirty` with uncommitted changes), else its version.

    Recorded in summary.json so that a results table can name the code each of its runs ran at.
    """
    checkout = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        # An installed copy may sit inside some other repository (a virtual environment in a checkout).
        if Path(git("rev-parse", "--show-toplevel")).resolve() == checkout:
            return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from dmssl import __version__

    return __version__


def has_trained(run_dir: Path) -> bool:
    """Whether a run in the folder got as far as training: a checkpoint or an evaluation. A run that stopped
    before (bad data, a typo found late) leaves only its config.yaml, which must not block the corrected rerun."""
    checkpoints = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)


def check_run_dir(cfg: Config) -> Path:
    """The run folder; refuse to mix two different runs in one folder (reads only, on every process)."""
    run_dir = Path(cfg.output_dir or f"runs/{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}")
    config_file = run_dir / "config.yaml"
    check_writable_folder(run_dir, "output_dir")
    if config_file.is_file() and not cfg.overwrite and has_trained(run_dir):
        if cfg.resume == "never":
            raise CheckpointError(
                f"output_dir={str(run_dir)!r} already holds a run; pass resume=auto to continue it, "
                "overwrite=true to replace it, or another output_dir"
            )
        try:
            previous = flatten(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError as err:
            raise CheckpointError(f"{config_file} is not valid YAML ({err}); pass overwrite=true to start afresh") from None
        changed = changed_settings(previous, cfg)
        if changed:
            raise CheckpointError(
                f"output_dir={str(run_dir)!r} holds a different run ({changed}); resume it with the same settings,"
                " or pass overwrite=true / another output_dir"
            )
    return run_dir


def changed_settings(previous: dict[str, Any], cfg: Config) -> str:
    """The settings of `cfg` that differ from a run's flattened config `previous` ('' if none), shown as
    `key: old -> new`; keys in RESUMABLE_CHANGES may differ."""
    current = run_identity(cfg)
    changed = sorted(k for k in current if k in previous and previous[k] != current[k])
    return ", ".join(f"{k}: {previous[k]!r} -> {current[k]!r}" for k in changed[:5])


def check_writable_folder(folder: Path, key: str) -> None:
    """`folder` is, or can become, a folder this process writes in: not a file, not under one, not read-only."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {str(existing)!r}, which is a file"
        raise CheckpointError(f"{key}={str(folder)!r} {where}; give a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{key}={str(folder)!r} cannot be written: {str(existing)!r} is read-only for this user")


class RunLock:
    """An exclusive lock on a run folder while a process trains in it (`RUN_DIR/.lock`).

    Two processes in one folder (a requeued job while the first still runs) would interleave their logs
    and checkpoints; the second stops with `RunFolderBusy`, naming the holder. The lock is the operating
    system's (`flock`), so a process that dies, even by SIGKILL, releases it: a stale lock file is taken
    over. `active=False` (the other processes of a multi-process run) holds nothing.
    """

    FILE = ".lock"

    def __init__(self, run_dir: Path, active: bool = True) -> None:
        self.path, self.active = run_dir / self.FILE, active
        self.handle: Any = None

    def __enter__(self) -> RunLock:
        if not self.active:
            return self
        try:
            import fcntl
        except ImportError:  # no flock (Windows): nothing to hold
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusy(f"output_dir={str(self.path.parent)!r} is in use by {holder}; wait for it to finish "
                                "or stop it (resume=auto then continues), or pass another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.truncate(0)
            self.handle.close()  # closing releases the flock
            self.handle = None


def write_run_dir(cfg: Config, run_dir: Path) -> None:
    """Create the folder (clearing an overwritten run's results) and save the resolved config (main process)."""
    if cfg.overwrite and run_dir.exists():
        for name in ("checkpoints", "metrics.jsonl", "train.jsonl", "summary.json", "embeddings", "plots",
                     "confusion_matrix.json", "model.json"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, allow_nan=False, default=str) + "\n")


def keep_metric_lines_up_to(metrics_file: Path, step: int) -> None:
    """On resume, drop evaluations a killed run logged after its last checkpoint (they will be redone)."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a torn line of a killed run: its step is redone anyway
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    metrics_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def save_train_state(state: TrainState, folder: Path, cfg: Config) -> None:
    """Checkpoint `state` as step_XXXXXXXX.pt in `folder` and keep the newest `trainer.keep_checkpoints`."""
    path = checkpoint_path(folder, state.step)
    save_checkpoint(state.state_dict(config_to_dict(cfg)), path)
    prune_checkpoints(folder, cfg.trainer.keep_checkpoints, newest=path)


class EmbeddingSnapshot:
    """Embeddings of a fixed, seeded sample of labeled and unlabeled data, saved for plots.

    `python -m dmssl.plot RUN_DIR` projects them to 2-D to show how matching moves the unlabeled cloud.
    """

    def __init__(self, adapter: Any, labeled: list, labels: list[int], pool: list, seed: int, batch_size: int,
                 size: int = 500) -> None:
        self.adapter, self.batch_size = adapter, batch_size
        keep_l = seeded_subset(len(labeled), size, seed + 13)
        keep_u = seeded_subset(len(pool), size, seed + 17)
        self.samples = [labeled[i] for i in keep_l] + [pool[i][0] for i in keep_u]
        self.targets = [labels[i] for i in keep_l] + [pool[i][1] for i in keep_u]
        self.is_labeled = [True] * len(keep_l) + [False] * len(keep_u)

    @torch.no_grad()
    def save(self, model: SSLModel, device: torch.device, path: Path) -> None:
        model.eval()
        parts = []
        for start in range(0, len(self.samples), self.batch_size):
            views = [self.adapter.test_view(s) for s in self.samples[start: start + self.batch_size]]
            parts.append(model(send_to_device(self.adapter.collate(views), device)).float().cpu())
        path.parent.mkdir(parents=True, exist_ok=True)
        import numpy as np

        np.savez(path, embeddings=torch.cat(parts).numpy(), targets=np.array(self.targets),
                 is_labeled=np.array(self.is_labeled), prototypes=model.prototypes.float().cpu().numpy())
