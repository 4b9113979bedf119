"""FixMatch's image views on a whole batch at once: flip, reflect-pad-and-crop, RandAugment, Cutout.

Per-image transforms pay a Python round trip and a few tiny tensor ops for every image; on small
images (8x8 digits, 32x32 CIFAR-10) that overhead, not the arithmetic, is what the loader spends its
time on. Here every random choice is drawn for the whole batch with one call, and each RandAugment
operation runs once, on the sub-batch of images that drew it.

Inputs and outputs are uint8 tensors (B, C, H, W). All randomness comes from torch's global RNG,
which the core seeds for every training step, so views are reproducible and runs resumable.

RandAugment follows torchvision's `v2.RandAugment` (its 14 operations, their magnitude tables at
31 bins, a random sign for the signed ones, nearest interpolation, black fill), so the recipes'
`randaugment_ops` and `randaugment_magnitude` mean what they meant with torchvision's transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

NUM_MAGNITUDE_BINS = 31


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images)) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad every side by `padding`, then crop each image back to its size at a random offset."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode="reflect")
    top = torch.randint(0, 2 * padding + 1, (b,))
    left = torch.randint(0, 2 * padding + 1, (b,))
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def cutout(images: torch.Tensor, fraction: float, fill: int = 127) -> torch.Tensor:
    """Grey out one square of side `fraction * size` per image, centred anywhere (DeVries & Taylor, 2017)."""
    if fraction <= 0:
        return images
    b, _, h, w = images.shape
    side = max(1, int(round(fraction * min(h, w))))
    cy, cx = torch.randint(h, (b,)), torch.randint(w, (b,))
    ys, xs = torch.arange(h), torch.arange(w)
    in_rows = (ys >= (cy - side // 2)[:, None]) & (ys < (cy + side - side // 2)[:, None])
    in_cols = (xs >= (cx - side // 2)[:, None]) & (xs < (cx + side - side // 2)[:, None])
    square = in_rows[:, :, None] & in_cols[:, None, :]
    return images.masked_fill(square[:, None], fill)


# ---------------------------------------------------------------- RandAugment

Operation = Callable[[torch.Tensor, float], torch.Tensor]


def _shear_x(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0])


def _shear_y(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))], center=[0, 0])


def _translate_x(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0])


def _translate_y(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0])


# name -> (operation, magnitude table(height, width) or None, signed)
RANDAUGMENT_OPERATIONS: dict[str, tuple[Operation, Callable[[int, int], torch.Tensor] | None, bool]] = {
    "Identity": (lambda x, m: x, None, False),
    "ShearX": (_shear_x, lambda h, w: torch.linspace(0.0, 0.3, NUM_MAGNITUDE_BINS), True),
    "ShearY": (_shear_y, lambda h, w: torch.linspace(0.0, 0.3, NUM_MAGNITUDE_BINS), True),
    "TranslateX": (_translate_x, lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * w, NUM_MAGNITUDE_BINS), True),
    "TranslateY": (_translate_y, lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * h, NUM_MAGNITUDE_BINS), True),
    "Rotate": (lambda x, m: TF.rotate(x, angle=m), lambda h, w: torch.linspace(0.0, 30.0, NUM_MAGNITUDE_BINS), True),
    "Brightness": (lambda x, m: TF.adjust_brightness(x, 1.0 + m), lambda h, w: torch.linspace(0.0, 0.9, NUM_MAGNITUDE_BINS), True),
    "Color": (lambda x, m: TF.adjust_saturation(x, 1.0 + m), lambda h, w: torch.linspace(0.0, 0.9, NUM_MAGNITUDE_BINS), True),
    "Contrast": (lambda x, m: TF.adjust_contrast(x, 1.0 + m), lambda h, w: torch.linspace(0.0, 0.9, NUM_MAGNITUDE_BINS), True),
    "Sharpness": (lambda x, m: TF.adjust_sharpness(x, 1.0 + m), lambda h, w: torch.linspace(0.0, 0.9, NUM_MAGNITUDE_BINS), True),
    "Posterize": (lambda x, m: TF.posterize(x, bits=int(m)),
                  lambda h, w: (8 - torch.arange(NUM_MAGNITUDE_BINS) / ((NUM_MAGNITUDE_BINS - 1) / 4)).round().int(), False),
    "Solarize": (lambda x, m: TF.solarize(x, threshold=255.0 * m), lambda h, w: torch.linspace(1.0, 0.0, NUM_MAGNITUDE_BINS), False),
    "AutoContrast": (lambda x, m: TF.autocontrast(x), None, False),
    "Equalize": (lambda x, m: TF.equalize(x), None, False),
}


def rand_augment(images: torch.Tensor, num_ops: int, magnitude: int) -> torch.Tensor:
    """RandAugment (Cubuk et al., 2020): `num_ops` rounds; in each, every image draws one of the 14
    operations uniformly and, for signed ones, a sign; each (operation, sign) group runs as one batch."""
    if not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"magnitude={magnitude} must be in [0, {NUM_MAGNITUDE_BINS - 1}]")
    names = list(RANDAUGMENT_OPERATIONS)
    _, _, h, w = images.shape
    for _ in range(num_ops):
        chosen = torch.randint(len(names), (len(images),))
        negative = torch.rand(len(images)) <= 0.5
        out = images.clone()
        for k in chosen.unique().tolist():
            operation, table, signed = RANDAUGMENT_OPERATIONS[names[k]]
            value = float(table(h, w)[magnitude]) if table is not None else 0.0
            for sign in ((1.0, -1.0) if signed else (1.0,)):
                members = chosen == k
                if signed:
                    members &= negative if sign < 0 else ~negative
                idx = members.nonzero().squeeze(1)
                if len(idx):
                    out[idx] = operation(images[idx], sign * value)
        images = out
    return images
