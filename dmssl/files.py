"""File helpers for adapters: walking a folder or a .tar.gz, and an atomic, keyed array cache."""

from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dmssl.errors import DataError


def iter_data_files(root: Path, suffixes: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """(relative path parts, bytes) of every file with one of `suffixes` in a folder or a .tar(.gz), by path.

    Archives are read in place (no extraction to disk).
    """
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in suffixes and path.is_file():
                yield path.relative_to(root).parts, path.read_bytes()
    elif root.is_file() and tarfile.is_tarfile(root):
        with tarfile.open(root) as archive:
            for member in sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name):
                if Path(member.name).suffix.lower() in suffixes:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield Path(member.name).parts, handle.read()
    else:
        raise DataError(f"data.root={str(root)!r} is neither a folder nor a readable .tar or .tar.gz archive")


def cache_file(cache_dir: str | None, prefix: str, *key_parts: object) -> Path:
    """`<cache_dir or ~/.cache/dmssl>/<prefix>-<hash of key_parts>.npz`."""
    key = hashlib.sha1(repr(key_parts).encode()).hexdigest()[:16]
    return Path(cache_dir or Path.home() / ".cache" / "dmssl") / f"{prefix}-{key}.npz"


def file_identity(path: Path) -> tuple[str, int, int]:
    """What makes a cached decode of `path` stale: its absolute path, size and modification time."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def write_npz_atomic(path: Path, arrays: dict[str, Any]) -> None:
    """Save arrays to `path` via a temporary file and a rename; a failure only warns (the cache is optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write the cache {path}: {err}", stacklevel=2)


def stored_groups(arrays: Any, split: str) -> list[str] | None:
    """`<split>_groups` of a cached npz as group names (RawData.train_groups / test_groups); None if not stored."""
    key = f"{split}_groups"
    return [str(g) for g in arrays[key]] if key in arrays else None
