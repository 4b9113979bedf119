"""A frozen encoder's outputs, computed once and shared by every run, seed and objective that matches.

With `model.freeze=all` the encoder never changes, so running it at every step is waste: a CPU spends
nearly all of a step there. The cache runs it once per (sample, view) instead:

    train.npy   (N, 1 + 2K, D) float16: per training sample the run uses (labeled, dev, pool; all of them unless
                the pool is subsampled), in the data's order,
                view 0 = the clean test view, 1..K = weak views, K+1..2K = strong views
    test.npy    (M, D) float16: the test view of each test sample the run evaluates
    header.json the key and the shapes; written last, so a cache without it is incomplete

With `model.freeze=N` on an encoder that runs in two parts (dmssl/pretrained.py: `encode_prefix`, `encode_from`),
the cache holds the frozen lower N blocks' outputs instead, (N, 1 + 2K, *shape) and (M, *shape), and each step
runs the trainable top on them: the key then names N as well.

A view equal to its sample's clean view (text's weak view with no token dropout) is copied from view 0
instead of encoded again: with the text recipes' settings that is 2 of every 5 views.

Views come from one seeded stream (`VIEW_STREAM_SEED`, sample i and view v seed their own draw), so the
same key always means the same bytes, and runs of every seed share one cache: a run's seed decides which
cached view each step draws. Files are memory-mapped, never loaded whole. The key covers the data's
content (a digest of every sample), the encoder's weights, the adapter's options (the views; a path among them
as its real absolute path, so one file spelled two ways is one cache), K, the
stream seed and the number format the encoder ran in (fp32, or bf16 where `trainer.mixed_precision=auto`
measured it faster, or `=bf16`; an existing cache of either format is used before anything is measured); a cache built for anything else is rebuilt, never reused, and so is one that is incomplete or
does not match its header (with a warning that names it). One process builds while others wait on a lock.

`CachedViews` then stands in for the adapter during training: its samples are rows of the cache, its views
are cached rows, and its batches are `CachedInputs`, for which `SSLModel` skips the encoder. Everything else
(splits, steps, evaluation, checkpoints) is the core's, unchanged; a trained model keeps the real encoder's
weights, so `dmssl.load`, `predict` and `export` read raw samples as with any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch import nn

from dmssl.data import seeded_rng
from dmssl.errors import CheckpointError
from dmssl.files import remove_stale_temporaries, temporary_folder
from dmssl.modality import Modality, RawData
from dmssl.model import CachedInputs

VIEW_STREAM_SEED = 0
FORMAT = 2  # 2: options' paths written as real absolute paths (options_identity)


@dataclass(frozen=True)
class CachedSample:
    """A sample as the cache knows it: a row of train.npy or test.npy."""

    split: str  # "train" (train and unlabeled samples) or "test"
    row: int


def content_digest(samples: Any) -> str:
    """A digest of samples' content: tensors and arrays by their bytes, anything else by its repr."""
    digest = hashlib.sha1()
    for sample in samples:
        if isinstance(sample, torch.Tensor):
            digest.update(sample.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(sample, np.ndarray):
            digest.update(np.ascontiguousarray(sample).tobytes())
        else:
            digest.update(repr(sample).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def options_identity(options: Any) -> str:
    """The adapter's options as the key records them (they decide the views). An option naming a file or folder
    that exists is written as its real absolute path: one file spelled two ways ('../data/x.jsonl',
    '/home/me/data/x.jsonl', a link to it) is one cache, not two encoding passes."""
    if not dataclasses.is_dataclass(options):
        return repr(options)

    def located(value: Any) -> Any:
        if isinstance(value, str) and value and os.path.exists(value):
            return os.path.realpath(value)
        if isinstance(value, (list, tuple)):
            return [located(v) for v in value]
        return value

    return repr({"class": type(options).__qualname__,
                 **{f.name: located(getattr(options, f.name)) for f in dataclasses.fields(options)}})


COMPUTED_IN = {"no": "float32", "bf16": "bfloat16"}  # the encoder's number format while caching


def cache_key(adapter: Modality, raw: RawData, encoder: nn.Module, views: int, computed_in: str = "float32",
              prefix_blocks: int = 0) -> dict[str, Any]:
    """What the cached bytes depend on; any change gives another cache."""
    key = {"format": FORMAT, "adapter": f"{type(adapter).__module__}.{type(adapter).__qualname__}",
           "options": options_identity(adapter.options), "train": content_digest(list(raw.train) + list(raw.unlabeled)),
           "test": content_digest(raw.test), "encoder": type(encoder).__qualname__, "weights": weights_digest(encoder),
           "views": views, "stream_seed": VIEW_STREAM_SEED, "dtype": "float16", "computed_in": computed_in}
    if prefix_blocks:  # absent for a whole encoder's outputs, so that the caches built before keep their key
        key["prefix_blocks"] = prefix_blocks
    return key


def encoding(encoder: nn.Module, prefix_blocks: int) -> Callable[[Any], torch.Tensor]:
    """What the cache stores of a batch: the encoder's outputs, or its lower `prefix_blocks` blocks' outputs."""
    if prefix_blocks:
        return lambda batch: encoder.encode_prefix(batch, prefix_blocks)
    return encoder


def cache_folder(cache_dir: str | None, key: dict[str, Any]) -> Path:
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or Path.home() / ".cache" / "dmssl") / f"features-{name}"


class FeatureCache:
    """An opened, complete cache: memory-mapped arrays and the K they were made with."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        header = json.loads((folder / "header.json").read_text(encoding="utf-8"))
        if header.get("key") != key:
            raise CheckpointError(f"{folder} was built for other data, encoder or views")
        self.train = np.load(folder / "train.npy", mmap_mode="r")
        self.test = np.load(folder / "test.npy", mmap_mode="r")
        if list(self.train.shape) != header["train_shape"] or list(self.test.shape) != header["test_shape"]:
            raise CheckpointError(f"{folder}: its arrays do not have the shapes its header records")
        self.folder, self.views = folder, int(key["views"])
        self.prefix_blocks = int(key.get("prefix_blocks", 0))


def open_or_build(adapter: Modality, raw: RawData, encoder: nn.Module, views: int, cache_dir: str | None,
                  device: torch.device, batch_size: int, log: Any = print,
                  precision: str | Callable[[], str] = "no", prefix_blocks: int = 0) -> FeatureCache:
    """The cache for this data, encoder and views: opened if a complete one exists (computed in either number
    format), else built (under a lock, so that concurrent runs build it once) in `precision` ("no": fp32,
    "bf16": bf16 autocast; a callable decides, e.g. by measuring, and is called only when a cache is built).
    With `prefix_blocks` = n > 0 it holds the outputs of the encoder's lower n blocks (`encode_prefix`)."""
    keys = {mode: cache_key(adapter, raw, encoder, views, computed_in, prefix_blocks)
            for mode, computed_in in COMPUTED_IN.items()}
    folders = {mode: cache_folder(cache_dir, key) for mode, key in keys.items()}
    parent = folders["no"].parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"data.cache_dir: cannot create {str(parent)!r} for the feature cache "
                              f"({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"data.cache_dir: {str(parent)!r} is read-only; the feature cache needs a "
                              "writable folder (set data.cache_dir)")
    with build_lock(folders["no"]):  # one lock for both formats: one build of the same data at a time
        for mode, folder in folders.items():
            if folder.is_dir():
                try:
                    cache = FeatureCache(folder, keys[mode])
                    log(f"feature cache: {folder} ({size_of(folder) / 2**20:.1f} MiB, computed in "
                        f"{COMPUTED_IN[mode]}), built before")
                    return cache
                except (OSError, ValueError, KeyError, CheckpointError, json.JSONDecodeError) as err:
                    warnings.warn(f"the feature cache {folder} is incomplete or corrupt ({err}); rebuilding it",
                                  stacklevel=2)
                    shutil.rmtree(folder, ignore_errors=True)
        mode = precision() if callable(precision) else precision
        if mode not in COMPUTED_IN:
            raise ValueError(f"cache precision {mode!r}; allowed: {', '.join(COMPUTED_IN)}")
        build(adapter, raw, encoder, views, folders[mode], keys[mode], device, batch_size, log, mode == "bf16",
              prefix_blocks)
        return FeatureCache(folders[mode], keys[mode])


class build_lock:
    """An exclusive `flock` on `<folder>.lock` while a cache is looked up or built."""

    def __init__(self, folder: Path) -> None:
        self.path = folder.with_name(folder.name + ".lock")
        self.handle: Any = None

    def __enter__(self) -> build_lock:
        try:
            import fcntl
        except ImportError:
            return self
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)  # waits for another process's build
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@torch.no_grad()
def build(adapter: Modality, raw: RawData, encoder: nn.Module, views: int, folder: Path, key: dict[str, Any],
          device: torch.device, batch_size: int, log: Any, bf16: bool = False, prefix_blocks: int = 0) -> None:
    """Encode every (sample, view) into a temporary folder, then rename it into place."""
    from tqdm.auto import tqdm

    train = list(raw.train) + list(raw.unlabeled)
    encoder = encoder.to(device).eval()
    run = encoding(encoder, prefix_blocks)
    remove_stale_temporaries(folder.parent)
    staging = temporary_folder(folder)
    started = time.monotonic()
    try:
        # One sample's output shape: (feature_dim,) for a whole encoder, the prefix's (e.g. C, H, W) otherwise.
        probe = (train or list(raw.test))[:1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            shape = tuple(run(send_to_device(adapter.collate([adapter.test_view(s) for s in probe]), device)).shape[1:])
        train_out = np.lib.format.open_memmap(staging / "train.npy", mode="w+", dtype=np.float16,
                                              shape=(len(train), 1 + 2 * views, *shape))
        test_out = np.lib.format.open_memmap(staging / "test.npy", mode="w+", dtype=np.float16,
                                             shape=(len(raw.test), *shape))
        total = len(train) * (1 + 2 * views) + len(raw.test)
        bar = tqdm(total=total, desc="caching features", unit="view", dynamic_ncols=True, mininterval=2.0)

        def encode(view_list: list[Any]) -> np.ndarray:
            batch = send_to_device(adapter.collate(view_list), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return run(batch).float().cpu().numpy().astype(np.float16)

        reused = 0
        train_order = length_order(adapter, train)
        for start in range(0, len(train), batch_size):
            rows = train_order[start: start + batch_size]
            clean: list[Any] = []
            for v in range(1 + 2 * views):
                made = []
                for i in rows:  # each (sample, view) draws from its own seed: the same bytes on every rebuild
                    with seeded_rng(VIEW_STREAM_SEED * 1_000_003 + int(i) * (1 + 2 * views) + v):
                        sample = train[i]
                        made.append(adapter.test_view(sample) if v == 0 else
                                    adapter.weak_views([sample])[0] if v <= views else adapter.strong_views([sample])[0])
                if v == 0:
                    clean = made
                    train_out[rows, 0] = encode(made)
                else:
                    # A view equal to the clean one (a weak view that changes nothing, as text's with no token
                    # dropout) has the clean view's output: copied, not encoded again.
                    fresh = [j for j, view in enumerate(made) if not same_view(view, clean[j])]
                    out = np.array(train_out[rows, 0])
                    if fresh:
                        out[fresh] = encode([made[j] for j in fresh])
                    train_out[rows, v] = out
                    reused += len(made) - len(fresh)
                bar.update(len(made))
        test_order = length_order(adapter, raw.test)
        for start in range(0, len(raw.test), batch_size):
            rows = test_order[start: start + batch_size]
            test_out[rows] = encode([adapter.test_view(raw.test[j]) for j in rows])
            bar.update(len(rows))
        bar.close()
        train_out.flush()
        test_out.flush()
        del train_out, test_out
        seconds = time.monotonic() - started
        header = {"key": key, "train_shape": [len(train), 1 + 2 * views, *shape], "test_shape": [len(raw.test), *shape],
                  "encode_seconds": round(seconds, 2), "views_per_second": round(total / max(seconds, 1e-9), 2),
                  "views_copied": reused}
        (staging / "header.json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    copied = f"; {reused:,} equal to their clean view, copied" if reused else ""
    log(f"feature cache: encoded {total:,} views in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} views/s, "
        f"{'bf16' if bf16 else 'fp32'}{copied}), {size_of(folder) / 2**20:.1f} MiB in {folder}")


def length_order(adapter: Modality, samples: list[Any]) -> np.ndarray:
    """Sample indices in the order the cache encodes them: by the length of the clean view where views are
    sequences (token ids), else as they come. A batch pads to its longest member, so batches of similar
    lengths skip most of the padding's work (1.85x fewer token positions on the 8,000 Amazon reviews at 256
    tokens, batches of 64); where each row is written, and what it holds, stay the same."""
    # len(), not truthiness: a modality may hold its samples in one tensor (images as uint8).
    if len(samples) == 0 or not isinstance(adapter.test_view(samples[0]), (list, tuple)):
        return np.arange(len(samples))
    return np.argsort([len(adapter.test_view(s)) for s in samples], kind="stable")


def same_view(a: Any, b: Any) -> bool:
    """Whether two views of a sample are the same input (tensors and arrays by value, anything else by ==)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # a comparison that has no single truth value: treat the views as different
        return False


class CachedViews(Modality):
    """The adapter during a cached run: samples are cache rows, views are cached rows, batches `CachedInputs`.

    A weak view is one of the K cached weak views, drawn with Python's `random` (which the core seeds per
    step, so the draw is part of the run's seeded, resumable stream); a strong view likewise."""

    def __init__(self, inner: Modality, cache: FeatureCache) -> None:
        super().__init__(inner.options, inner.data, inner.model)
        self.inner, self.cache = inner, cache

    def load(self) -> RawData:  # its samples are the cache's rows (dmssl.trainer.cached_inputs)
        raise NotImplementedError

    def weak(self, sample: CachedSample) -> torch.Tensor:
        return self._row(sample, random.randint(1, self.cache.views))

    def strong(self, sample: CachedSample) -> torch.Tensor:
        return self._row(sample, random.randint(self.cache.views + 1, 2 * self.cache.views))

    def test_view(self, sample: CachedSample) -> torch.Tensor:
        return self._row(sample, 0)

    def _row(self, sample: CachedSample, view: int) -> torch.Tensor:
        if sample.split == "test":
            return torch.from_numpy(np.array(self.cache.test[sample.row], dtype=np.float32))
        return torch.from_numpy(np.array(self.cache.train[sample.row, view], dtype=np.float32))

    def collate(self, views: list[torch.Tensor]) -> CachedInputs:
        if self.cache.prefix_blocks:
            return CachedInputs(hidden=torch.stack(views), prefix_blocks=self.cache.prefix_blocks)
        return CachedInputs(features=torch.stack(views))

    def build_encoder(self) -> nn.Module:
        return self.inner.build_encoder()
