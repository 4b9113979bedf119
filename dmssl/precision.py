"""Which number format a run computes in, and why: `trainer.mixed_precision` and `trainer.channels_last`.

`auto` picks bf16 autocast where the hardware multiplies bf16 natively and fp32 elsewhere:

- a CUDA GPU that supports bf16 (Ampere and newer);
- an x86 CPU with AMX tiles or AVX512_BF16 (oneDNN runs convolutions and matrix products in bf16
  there, about 2-3x faster than fp32 for the project's encoders);
- anything else: fp32. Without those instructions bf16 is emulated and slower than fp32.

Only the model's forward runs under autocast: the model returns fp32 embeddings (`SSLModel.forward`
casts before normalising), so the losses, the distances, the pseudo-label probabilities and the
optimizer's update all stay in fp32. Parameters, gradients and optimizer state are fp32 throughout.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """The resolved choice: `mode` is what Accelerate receives ('no', 'bf16', 'fp16' or None), `reason` says why."""

    mode: str | None
    reason: str
    channels_last: bool

    def describe(self) -> str:
        shown = {None: "as accelerate launch set it", "no": "fp32"}.get(self.mode, self.mode)
        layout = ", channels-last" if self.channels_last else ""
        return f"precision: {shown}{layout} ({self.reason})"


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 instruction sets of this CPU (empty where there are none or they cannot be read)."""
    found: list[str] = []
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    cpu = getattr(torch._C, "_cpu", None)
    for flag, probe in probes.items():
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                found.append(flag)
        except RuntimeError:
            pass
    if found or platform.system() != "Linux":
        return found
    try:  # older builds without the probes: the kernel's flags
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in CPU_BF16_FLAGS if f in flags]
    except OSError:
        pass
    return found


def choose_precision(requested: str, on_cuda: bool, channels_last: bool = True) -> Precision:
    """Resolve `trainer.mixed_precision` (auto, no, bf16, fp16); `channels_last` is passed through."""
    if requested == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        mode, reason = None, "accelerate launch --mixed_precision"
    elif requested != "auto":
        mode, reason = requested, f"trainer.mixed_precision={requested}"
    elif on_cuda:
        if torch.cuda.is_bf16_supported():
            mode, reason = "bf16", f"auto: {torch.cuda.get_device_name()} computes bf16 natively"
        else:
            mode, reason = "no", f"auto: {torch.cuda.get_device_name()} has no bf16"
    else:
        found = cpu_bf16_instructions()
        if found:
            mode, reason = "bf16", f"auto: this CPU has {' and '.join(found)}"
        else:
            mode, reason = "no", "auto: this CPU has no native bf16 (no AMX or AVX512_BF16), where bf16 is slower than fp32"
    return Precision(mode=mode, reason=reason, channels_last=channels_last)
