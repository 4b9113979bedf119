"""Image modality: CIFAR-10/100, image-folder trees (folder or .tar.gz), scikit-learn's digits.

Samples are uint8 tensors (C, H, W); the encoder converts to float on the training device, so
workers move bytes, not floats. Views follow FixMatch: weak = horizontal flip + reflect-pad-and-crop;
strong = weak + RandAugment + Cutout (a grey square). The core builds a step's views
with `weak_views`/`strong_views`, which run each transform once on the whole batch (image_augment.py).

Data sources (`data.dataset`):
    cifar10, cifar100   torchvision's datasets (downloaded to data.cache_dir where the internet is
                        reachable), or `data.root` = an image-folder tree / .tar.gz of one
    folder              `data.root` = a folder or .tar.gz holding train/<class>/*.{png,jpg} and
                        test/<class>/*
    digits              scikit-learn's 8x8 handwritten digits (1,797 images, bundled with the package):
                        a seeded 500-image test split, the rest for training
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmssl.errors import ConfigError, DataError
from dmssl.files import cache_file, iter_data_files, read_npz_cache, stored_groups, tree_identity, write_npz_atomic
from dmssl.modality import Modality, RawData, check_pattern, group_of
from modalities.image_augment import cutout, rand_augment, random_crop, random_hflip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageOptions:
    """`modality:` keys of the image adapter."""

    image_size: int | None = None  # resize every image to this square size; None keeps the native size
    hflip: bool = True  # horizontal flips in the views (off for digits and text-like images)
    pad_fraction: float = 0.125  # reflect padding before the random crop, as a fraction of the size
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9  # torchvision's scale, 0-30
    cutout_fraction: float = 0.5  # side of the Cutout square as a fraction of the image size
    image_column: str = "image"  # data.dataset=hf: the column of images (a datasets.Image feature, or bytes/paths)
    label_column: str = "label"  # data.dataset=hf: the column of class labels
    # a regex on a file's path inside data.root ('/'-separated); its first group names the file's group (e.g. a
    # domain folder, '^([^/]+)/'), for data.labeled_groups / data.target_groups; image folders only
    group_pattern: str | None = None
    # model.encoder=pretrained: any timm model, by name (downloaded where the hub is reachable) or a local folder
    # (config.json + weights, as timm's hub layout); input size, mean/std and interpolation are the model's own
    pretrained: str | None = None
    pretrained_size: int | None = None  # resize to this square size at encode time instead of the model's own

    def validate(self) -> None:
        if self.pretrained_size is not None and self.pretrained_size < 16:
            raise ConfigError(f"modality.pretrained_size={self.pretrained_size} must be >= 16")
        check_pattern("group_pattern", self.group_pattern, "the group name", "'^([^/]+)/' for <group>/train/<class>/*")
        if self.image_size is not None and self.image_size < 4:
            raise ConfigError(f"modality.image_size={self.image_size} must be >= 4")
        if not 0 <= self.pad_fraction <= 0.5:
            raise ConfigError(f"modality.pad_fraction={self.pad_fraction} must be in [0, 0.5]")
        if not 0 <= self.cutout_fraction <= 1:
            raise ConfigError(f"modality.cutout_fraction={self.cutout_fraction} must be in [0, 1]")
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise ConfigError("modality.randaugment_ops must be >= 0 and randaugment_magnitude in [0, 30]")


class ImageModality(Modality):
    """Images as uint8 (C, H, W) tensors; encoders small_cnn, wrn28_2, resnet18."""

    Options = ImageOptions
    encoders = ("small_cnn", "wrn28_2", "resnet18", "pretrained")
    # Unit-norm 128-d embeddings: a multi-bandwidth Gaussian around the median distance.
    defaults = {"distance": {"kernel": "gaussian", "median_scales": [0.5, 1.0, 2.0]}}

    input_suffixes = IMAGE_SUFFIXES

    def __init__(self, options: ImageOptions | None, data: Any, model: Any) -> None:
        super().__init__(options or ImageOptions(), data, model)
        depth = getattr(model, "depth", None)
        if depth is not None and getattr(model, "encoder", None) != "wrn28_2":
            raise ConfigError(f"model.depth={depth} is not used by model.encoder={model.encoder!r}; only wrn28_2 "
                              "takes a depth (6n+4: 10, 16, 22, 28, 40)")
        if getattr(model, "encoder", None) == "pretrained" and not self.options.pretrained:
            raise ConfigError("model.encoder=pretrained needs modality.pretrained: a timm model name (e.g. "
                              "tf_efficientnet_lite0) or a local folder holding one")
        if depth is not None and (depth - 4) % 6:
            raise ConfigError(f"model.depth={depth} is not a wide ResNet depth; allowed: 6n+4 (10, 16, 22, 28, 40)")
        self.in_channels = 3
        self.image_shape: tuple[int, int] | None = None  # (H, W) of the training images, once loaded

    # ---------------------------------------------------------------- data

    def load(self) -> RawData:
        source = self.data.dataset
        if source == "digits":
            raw = load_digits(seed=0)
        elif source == "hf":
            raw = load_hf_images(self.data, self.options)
        elif source in ("cifar10", "cifar100", "folder"):
            if self.data.root:
                raw = load_image_folder(Path(self.data.root), self.options.image_size, self.data.cache_dir,
                                        self.options.group_pattern)
            elif source == "folder":
                raise DataError("data.dataset=folder needs data.root: a folder or .tar.gz with train/<class>/* and test/<class>/*")
            else:
                raw = load_torchvision_cifar(source, self.data.cache_dir)
        else:
            raise ConfigError(f"data.dataset={source!r} is not an image source; allowed: cifar10, cifar100, folder, digits, hf")
        if self.options.group_pattern is not None and raw.train_groups is None:
            raise ConfigError(f"modality.group_pattern works on the file paths of an image folder (data.root); "
                              f"data.dataset={source!r} without one has none")
        first = raw.train[0]
        self.in_channels = int(first.shape[0])
        self.image_shape = (int(first.shape[1]), int(first.shape[2]))
        return raw

    # ---------------------------------------------------------------- a pretrained encoder in timm's format

    def export_encoder(self, encoder: nn.Module, folder: Path) -> bool:
        """A timm encoder, fine-tuned or not, as timm's hub folder: `timm.create_model("local-dir:" + folder,
        pretrained=True)` reads it back."""
        if not isinstance(encoder, TimmEncoder):
            return False
        from timm.models._hub import save_for_hf

        folder.mkdir(parents=True, exist_ok=True)
        save_for_hf(encoder.net, str(folder), safe_serialization=True)
        return True

    def use_exported_encoder(self, folder: Path) -> None:
        self.options.pretrained = str(folder)

    # ---------------------------------------------------------------- new samples for a trained model

    def inference_state(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "image_shape": list(self.image_shape) if self.image_shape else None}

    def restore_inference_state(self, state: dict[str, Any]) -> None:
        self.in_channels = int(state.get("in_channels", 3))
        shape = state.get("image_shape")
        self.image_shape = (int(shape[0]), int(shape[1])) if shape else None

    def samples_from(self, values: Sequence[Any]) -> list[torch.Tensor]:
        """Arrays or tensors, (H, W), (H, W, C) or (C, H, W); uint8 0-255 or float in [0, 1]; PIL images.

        Converted to the model's channels (grey <-> RGB, alpha dropped) and resized to its training size.
        """
        return [self.to_model_input(value, f"sample {i}") for i, value in enumerate(values)]

    def read_inputs(self, path: Path) -> list[torch.Tensor]:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else
                                                 "L" if image.mode in ("L", "1", "I;16", "I", "F") else "RGB"))
        except Exception as err:  # PIL raises many types for broken or non-image files
            raise DataError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None
        return [self.to_model_input(array, str(path))]

    def split_batch(self, values: Any) -> list[Any]:
        """A batch (N, H, W, C) / (N, C, H, W) / (N, H, W) or a list of images; one (H, W, C) array is refused
        rather than read as H images of one row each."""
        if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim == 3 and values.shape[-1] in (1, 3, 4):
            raise DataError(f"an array of shape {tuple(values.shape)} looks like one (H, W, C) image; pass a batch "
                            "(1, H, W, C) or a list of images")
        return super().split_batch(values)

    def to_model_input(self, value: Any, name: str) -> torch.Tensor:
        if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
            value = np.asarray(value.convert("RGB"))
        if not isinstance(value, torch.Tensor):
            value = np.asarray(value)
            if value.dtype.kind not in "buif":
                raise DataError(f"{name}: an image must be a numeric array, tensor or PIL image; got {value.dtype} "
                                f"values ({type(value.flat[0]).__name__ if value.size else 'empty'})")
        tensor = torch.from_numpy(np.array(value)) if not isinstance(value, torch.Tensor) else value
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.uint8) * 255
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise DataError(f"{name}: an image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; "
                            f"got shape {tuple(tensor.shape)}")
        if tensor.shape[1] == 0 or tensor.shape[2] == 0:
            raise DataError(f"{name}: the image is empty (shape {tuple(tensor.shape)}); it needs at least one pixel")
        if tensor.dtype != torch.uint8:
            tensor = tensor.float()
            if not torch.isfinite(tensor).all():
                raise DataError(f"{name}: the image holds NaN or infinite values; float images hold values in [0, 1]")
            if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
                raise DataError(f"{name}: float images must hold values in [0, 1] (uint8: 0-255); got "
                                f"{float(tensor.min()):g} to {float(tensor.max()):g}")
            tensor = (tensor * 255).round().to(torch.uint8)
        if tensor.shape[0] == 4:
            tensor = tensor[:3]
        if tensor.shape[0] == 3 and self.in_channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            tensor = (tensor.float() * weights).sum(0, keepdim=True).round().to(torch.uint8)
        elif tensor.shape[0] == 1 and self.in_channels == 3:
            tensor = tensor.expand(3, -1, -1)
        if self.image_shape and tuple(tensor.shape[1:]) != self.image_shape:
            resized = F.interpolate(tensor[None].float(), size=self.image_shape, mode="bilinear", antialias=True,
                                    align_corners=False)[0]
            tensor = resized.round().clamp(0, 255).to(torch.uint8)
        return tensor.contiguous()

    # ---------------------------------------------------------------- views

    def weak(self, sample: torch.Tensor) -> torch.Tensor:
        """Flip (if modality.hflip) and reflect-pad-and-crop."""
        return self.weak_views([sample])[0]

    def strong(self, sample: torch.Tensor) -> torch.Tensor:
        """The weak view, then RandAugment, then Cutout."""
        return self.strong_views([sample])[0]

    def weak_views(self, samples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Weak views of a whole step's images in a few batched tensor ops (see image_augment)."""
        return self._per_size(samples, self._weak_batch)

    def strong_views(self, samples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._per_size(samples, self._strong_batch)

    def _weak_batch(self, images: torch.Tensor) -> torch.Tensor:
        if self.options.hflip:
            images = random_hflip(images)
        padding = max(1, round(images.shape[-1] * self.options.pad_fraction)) if self.options.pad_fraction > 0 else 0
        return random_crop(images, padding)

    def _strong_batch(self, images: torch.Tensor) -> torch.Tensor:
        opts = self.options
        images = rand_augment(self._weak_batch(images), opts.randaugment_ops, opts.randaugment_magnitude)
        return cutout(images, opts.cutout_fraction)

    @staticmethod
    def _per_size(samples: Sequence[torch.Tensor], transform: Any) -> list[torch.Tensor]:
        # Loaded data has one size; samples handed in from elsewhere may not, so batch per size.
        if len({tuple(s.shape) for s in samples}) <= 1:
            return list(transform(torch.stack(list(samples))).unbind(0)) if len(samples) else []
        return [transform(s[None])[0] for s in samples]

    def collate(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(views)

    # ---------------------------------------------------------------- encoder

    def build_encoder(self) -> nn.Module:
        name = self.model.encoder
        if name == "pretrained":
            return TimmEncoder(self.options.pretrained or "", self.in_channels, self.options.pretrained_size)
        factories = {"small_cnn": SmallCNN, "wrn28_2": WideResNet, "resnet18": ResNet18}
        if name not in factories:
            raise ConfigError(f"model.encoder={name!r} is not an image encoder; allowed: {', '.join(factories)}")
        kwargs = {"in_channels": self.in_channels}
        if self.model.width is not None:
            kwargs["width"] = self.model.width
        if self.model.depth is not None:  # wrn28_2 only (checked when the adapter is made)
            kwargs["depth"] = self.model.depth
        return factories[name](**kwargs)


# ---------------------------------------------------------------- loaders


def load_digits(seed: int = 0, test_size: int = 500) -> RawData:
    """scikit-learn's digits (8x8, values 0-16) as 1-channel uint8 images; a seeded test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = [int(y) for y in digits.target]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    test, train = sorted(order[:test_size]), sorted(order[test_size:])
    return RawData(train=images[train], train_labels=[labels[i] for i in train], test=images[test],
                   test_labels=[labels[i] for i in test], class_names=[str(d) for d in range(10)])


def load_torchvision_cifar(name: str, cache_dir: str | None) -> RawData:
    """CIFAR through torchvision, downloading into the cache folder when the internet is reachable."""
    from torchvision import datasets

    root = Path(cache_dir or Path.home() / ".cache" / "dmssl") / "torchvision"
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train, test = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as err:  # URLError, OSError, RuntimeError: all mean "not here and not reachable"
        raise DataError(
            f"{name} is not in {root} and could not be downloaded ({type(err).__name__}). Offline, set data.root to a "
            f"folder or .tar.gz with train/<class>/*.png and test/<class>/*.png (e.g. data.root=../shared/data/cifar10/"
            f"cifar10-jpg.tar.gz), or put torchvision's {name} files in {root}"
        ) from None

    def as_tensor(split: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)))

    return RawData(train=as_tensor(train), train_labels=list(map(int, train.targets)), test=as_tensor(test),
                   test_labels=list(map(int, test.targets)), class_names=list(train.classes))


def _decode(data: bytes, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def load_hf_images(data: Any, opts: ImageOptions) -> RawData:
    """data.dataset=hf: the image column, as encoded bytes (datasets.Image(decode=False)) decoded here to RGB."""
    import datasets

    from dmssl.hf_data import decode_encoded, hf_columns

    columns = hf_columns(data, opts.image_column, opts.label_column, datasets.Image(decode=False))

    def decode(values: list[Any], split: str) -> torch.Tensor:
        arrays = decode_encoded(values, lambda b: _decode(b, opts.image_size), opts.image_column, split, "image")
        if len({a.shape for a in arrays}) > 1:
            raise DataError(f"{split} images have different sizes; set modality.image_size")
        return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)

    train = decode(columns.train + columns.unlabeled, "train")
    return RawData(train=train[: len(columns.train)], train_labels=columns.train_labels, test=decode(columns.test, "test"),
                   test_labels=columns.test_labels, class_names=columns.class_names, unlabeled=train[len(columns.train):])


def load_image_folder(root: Path, size: int | None, cache_dir: str | None, group_pattern: str | None = None) -> RawData:
    """An image-folder tree train/<class>/* and test/<class>/* (at any depth inside `root`).

    Decoded arrays are cached (keyed by the size and modification time of every file under `root`, the image size and the group pattern), so the second run
    skips decoding. Unreadable files are skipped with a warning that counts them. With `group_pattern`, each
    file's group is the first group of the regex on its path inside `root` (checked before decoding).
    """
    if not root.exists():
        raise DataError(f"data.root={str(root)!r} does not exist; expected a folder or .tar.gz with train/<class>/* and test/<class>/*")
    cache = cache_file(cache_dir, "images", tree_identity(root), size, *([group_pattern] if group_pattern else []))
    cached = read_npz_cache(cache, _raw_from_arrays)
    if cached is not None:
        return cached

    splits: dict[str, tuple[list[np.ndarray], list[str], list[str]]] = {"train": ([], [], []), "test": ([], [], [])}
    grouping = re.compile(group_pattern) if group_pattern else None
    unreadable = 0
    for parts, data in iter_data_files(root, IMAGE_SUFFIXES):
        split_at = [i for i, p in enumerate(parts[:-2]) if p in splits]
        if not split_at:
            continue
        split, label = parts[split_at[-1]], parts[split_at[-1] + 1]
        group = group_of(grouping, "/".join(parts)) if grouping is not None else ""  # before decoding: fails fast
        try:
            array = _decode(data, size)
        except Exception:  # PIL raises many types for broken files
            unreadable += 1
            continue
        splits[split][0].append(array)
        splits[split][1].append(label)
        splits[split][2].append(group)
    if unreadable:
        warnings.warn(f"skipped {unreadable} unreadable image files under {root}", stacklevel=2)
    for split, (images, _, _) in splits.items():
        if not images:
            raise DataError(f"no readable images under {root} in {split}/<class>/ (layout: train/<class>/*.png, test/<class>/*.png)")
    shapes = {a.shape for a in splits["train"][0] + splits["test"][0]}
    if len(shapes) > 1:
        raise DataError(f"images under {root} have different sizes {sorted(shapes)[:3]}...; set modality.image_size")
    classes = sorted(set(splits["train"][1]))
    unknown = sorted(set(splits["test"][1]) - set(classes))
    if unknown:
        raise DataError(f"test classes {unknown} have no training images under {root}")
    index = {name: i for i, name in enumerate(classes)}
    arrays = {
        "train_x": np.stack(splits["train"][0]), "train_y": np.array([index[c] for c in splits["train"][1]]),
        "test_x": np.stack(splits["test"][0]), "test_y": np.array([index[c] for c in splits["test"][1]]),
        "classes": np.array(classes),
    }
    if grouping is not None:
        arrays.update(train_groups=np.array(splits["train"][2]), test_groups=np.array(splits["test"][2]))
    write_npz_atomic(cache, arrays)
    return _raw_from_arrays(arrays)


def _raw_from_arrays(arrays: Any) -> RawData:
    return RawData(train=torch.from_numpy(arrays["train_x"]), train_labels=arrays["train_y"].tolist(),
                   test=torch.from_numpy(arrays["test_x"]), test_labels=arrays["test_y"].tolist(),
                   class_names=[str(c) for c in arrays["classes"]], train_groups=stored_groups(arrays, "train"),
                   test_groups=stored_groups(arrays, "test"))


# ---------------------------------------------------------------- encoders


class ImageEncoder(nn.Module):
    """Base: uint8 or float (B, C, H, W) in, (B, feature_dim) out; scales bytes to about [-2, 2]."""

    feature_dim: int

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - 0.5) / 0.25


def create_timm_model(name: str) -> nn.Module:
    """`timm.create_model(name, pretrained=True, num_classes=0)`: a hub name, or a local folder (timm's
    `local-dir:` scheme); offline, a name that is not a folder is a one-line error."""
    try:
        import timm
    except ImportError:
        raise ConfigError("model.encoder=pretrained needs timm (pip install timm)") from None
    source = f"local-dir:{Path(name).resolve()}" if Path(name).is_dir() else name
    try:
        return timm.create_model(source, pretrained=True, num_classes=0)
    except RuntimeError as err:  # an unknown architecture name
        raise ConfigError(f"modality.pretrained={name!r} is not a timm model ({str(err).splitlines()[0]})") from None
    except Exception as err:  # OSError, connection and hub errors: not reachable
        if Path(name).is_dir():
            raise ConfigError(f"modality.pretrained={name!r} is a folder but holds no timm model ({err})") from None
        raise ConfigError(f"modality.pretrained={name!r} could not be loaded: the model hub is not reachable "
                          f"(offline?) and it is not a local folder ({type(err).__name__}); point "
                          "modality.pretrained at a folder with the model's config.json and weights") from None


class TimmEncoder(ImageEncoder):
    """A timm model without its classifier: uint8 (B, C, H, W) at the stored size in, resized batched to the
    model's input size (or `size`) with its interpolation, normalised with its mean and std, grey images
    repeated to RGB; out: its pooled features (B, num_features)."""

    def __init__(self, name: str, in_channels: int = 3, size: int | None = None) -> None:
        super().__init__()
        import timm

        self.net = create_timm_model(name)
        self.weights_from = name  # frozen weights are rebuilt from here, not stored (dmssl/frozen_weights.py)
        data_config = timm.data.resolve_data_config({}, model=self.net)
        self.size = int(size or data_config["input_size"][-1])
        self.interpolation = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        self.in_channels, self.feature_dim = in_channels, int(self.net.num_features)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)

    def freeze_units(self) -> list[nn.Module]:
        """timm's own coarse groups (its `group_matcher`, as used for layer-wise learning rates): the stem,
        each stage, the head."""
        from timm.models import group_modules

        groups = group_modules(self.net, self.net.group_matcher(coarse=True))
        return [nn.ModuleList([self.net.get_submodule(n) for n in names]) for _, names in sorted(groups.items())]

    def can_start_from(self, n: int) -> bool:
        """Whether the forward pass splits after n freeze units: for timm's EfficientNet / MobileNet family
        (stem, then one unit per stage of `blocks`, the head with the last), at 1 <= n <= the stages."""
        net = self.net
        sequential = all(hasattr(net, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))
        return sequential and len(self.freeze_units()) == 1 + len(net.blocks) and 1 <= n <= len(net.blocks)

    def encode_prefix(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """The output of the lower n freeze units (the stem and n - 1 stages): (B, C, H, W) feature maps."""
        x = self.net.bn1(self.net.conv_stem(self.prepare(images)))
        return self.net.blocks[: n - 1](x)

    def encode_from(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of `forward` after `encode_prefix(images, n)`: the other stages, the head, the pooling."""
        x = self.net.bn2(self.net.conv_head(self.net.blocks[n - 1:](hidden)))
        return self.net.forward_head(x)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation, align_corners=False,
                              antialias=x.shape[-1] > self.size).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images))


class SmallCNN(ImageEncoder):
    """Four conv-BN-ReLU blocks (width w, 2w, 4w, 4w), max-pooling between them, global average pool.

    About 13 M multiply-adds per 32x32 image at w=32: fast enough to train on 2 CPU cores.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(previous, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            previous = w
        self.body = nn.Sequential(*layers)
        self.feature_dim = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images)).mean(dim=(2, 3))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(pre)), 0.1))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(ImageEncoder):
    """Pre-activation WRN-28-w as used by FixMatch (leaky ReLU 0.1, BN momentum 0.001); WRN-28-2: 128 features."""

    def __init__(self, in_channels: int = 3, width: int = 2, depth: int = 28) -> None:
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                cin = channels[stage] if i == 0 else channels[stage + 1]
                stride = 1 if stage == 0 or i > 0 else 2
                blocks.append(_WideBlock(cin, channels[stage + 1], stride))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels[3], momentum=0.001)
        self.feature_dim = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.prepare(images)))
        return F.leaky_relu(self.bn(x), 0.1).mean(dim=(2, 3))


class ResNet18(ImageEncoder):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); 512 features."""

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        from torchvision.models import resnet18

        if width != 64:
            raise ConfigError(f"model.width={width}: resnet18 has a fixed width of 64")
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.feature_dim = 512

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images))
