"""File helpers: walking a folder or a .tar.gz, an atomic, keyed array cache, and temporary files a killed
process left behind.

Temporary files and folders are named `.<final name>.<pid>.<random>.tmp`, beside what they become, so that
the next writer can tell a dead writer's leftovers (removed) from a live writer's work (left alone).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
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


def extract_tar_safely(archive: Path, destination: Path) -> None:
    """Unpack a .tar(.gz) into `destination` (a new folder, renamed into place when whole). Members with an
    absolute path, `..`, a link out of the folder or a device are refused (tarfile's `data` filter), and
    nothing is written for an archive that holds one."""
    staging = temporary_folder(destination)
    try:
        with tarfile.open(archive) as handle:
            handle.extractall(staging, filter="data")
        os.replace(staging, destination)
    except tarfile.FilterError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive} holds a member that would be written outside {destination} or is not a plain "
                        f"file ({err}); refusing to unpack it") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive} cannot be unpacked ({type(err).__name__}: {err})") from None


def cache_file(cache_dir: str | None, prefix: str, *key_parts: object) -> Path:
    """`<cache_dir or ~/.cache/dmssl>/<prefix>-<hash of key_parts>.npz`."""
    key = hashlib.sha1(repr(key_parts).encode()).hexdigest()[:16]
    return Path(cache_dir or Path.home() / ".cache" / "dmssl") / f"{prefix}-{key}.npz"


def file_identity(path: Path) -> tuple[str, int, int]:
    """What makes a cached decode of the file `path` stale: its absolute path, size and modification time."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def tree_identity(path: Path) -> tuple[str, str]:
    """What makes a cache of a folder (or an archive) stale: the file's identity, or for a folder a digest of
    every file's relative path, size and modification time below it. Replacing an image, adding a class
    folder or touching a file changes it; reading costs one `stat` per file, no file is opened."""
    if not path.is_dir():
        return str(path.resolve()), repr(file_identity(path))
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            try:
                stat = full.stat()
            except OSError:  # a broken link or a file removed while walking: part of the identity too
                digest.update(f"{full.relative_to(path)}\0missing\n".encode())
                continue
            digest.update(f"{full.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return str(path.resolve()), digest.hexdigest()


def temporary_name(final: Path) -> str:
    """The prefix of a temporary file or folder that becomes `final`: `.<name>.<pid>.`; the writer adds a random part."""
    return f".{final.name}.{os.getpid()}."


TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files and folders in `folder` whose writing process is gone; returns them."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        found = TEMPORARY.match(entry.name)
        if found and int(found["pid"]) != os.getpid() and not process_alive(int(found["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def temporary_file(final: Path) -> tuple[int, str]:
    """An open temporary file beside `final` (`mkstemp`'s fd and name), after removing dead writers' leftovers."""
    remove_stale_temporaries(final.parent)
    return tempfile.mkstemp(prefix=temporary_name(final), suffix=".tmp", dir=final.parent)


def temporary_folder(final: Path) -> Path:
    """A new temporary folder beside `final`, after removing dead writers' leftovers."""
    remove_stale_temporaries(final.parent)
    return Path(tempfile.mkdtemp(prefix=temporary_name(final), suffix=".tmp", dir=final.parent))


def write_npz_atomic(path: Path, arrays: dict[str, Any]) -> None:
    """Save arrays to `path` via a temporary file and a rename; a failure only warns (the cache is optional)."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = temporary_file(path)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp_name, path)
    except OSError as err:
        if tmp_name:
            Path(tmp_name).unlink(missing_ok=True)
        warnings.warn(f"could not write the cache {path}: {err}", stacklevel=2)


CORRUPT_ARCHIVE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError)


def read_npz_cache(path: Path, read: Callable[[Any], Any]) -> Any | None:
    """`read(arrays)` of the cache file `path`, or None when there is none. A cache that cannot be read whole
    (truncated, a bad CRC, a missing array) is removed with a warning naming it, and None says: rebuild it.
    `read` must take everything it needs out of the arrays (they are read lazily from the file)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return read(stored)
    except CORRUPT_ARCHIVE as err:
        warnings.warn(f"the cache {path} is corrupt ({type(err).__name__}: {err}); rebuilding it", stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def stored_groups(arrays: Any, split: str) -> list[str] | None:
    """`<split>_groups` of a cached npz as group names (RawData.train_groups / test_groups); None if not stored."""
    key = f"{split}_groups"
    return [str(g) for g in arrays[key]] if key in arrays else None
