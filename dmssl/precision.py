"""Which number format a run computes in, and why: `trainer.mixed_precision` and `trainer.channels_last`.

`auto` decides by measuring, not by CPU flags: before the loop it times a few forward+backward passes
of the run's own model on the run's first real step, in fp32 and in bf16 autocast, rounds interleaved
(so that a machine loaded by other work slows both alike), and keeps bf16 only when it is faster by a
clear margin (`BF16_MARGIN`); a tie goes to fp32, the format that needs no argument. bf16 is a
candidate where the hardware multiplies it natively:

- a CUDA GPU that supports bf16 (Ampere and newer);
- an x86 CPU with AMX tiles or AVX512_BF16; whether oneDNN's bf16 kernels are faster there depends on
  the model: a tiny CNN on 8x8 digits runs 2x slower in bf16 on an AMX CPU, the CIFAR-10 CNN 1.9x faster;
- anything else has no candidate but fp32: without those instructions bf16 is emulated, 4-13x slower.

The choice is recorded in every checkpoint, so a resumed run keeps it without probing again (and stays
bit-identical to the uninterrupted run), and in summary.json with the timings. `DMSSL_AUTO_PRECISION=no`
or `=bf16` makes auto pick that format without measuring: the test suite runs once under each to show
that no test depends on what auto would choose.

Only the model's forward runs under autocast: the model returns fp32 embeddings (`SSLModel.forward`
casts before normalising), so the losses, the distances, the pseudo-label probabilities and the
optimizer's update all stay in fp32. Parameters, gradients and optimizer state are fp32 throughout.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dmssl.errors import ConfigError

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FORCE_ENV = "DMSSL_AUTO_PRECISION"  # no | bf16: what auto picks, without measuring
BF16_MARGIN = 1.10  # bf16 must be at least 10 % faster per step to be chosen over fp32
PROBE_ROUNDS = 3  # at least, per candidate; the first is a warm-up (kernel selection, allocator) and is not counted


@dataclass(frozen=True)
class Precision:
    """The resolved choice: `mode` is what Accelerate receives ('no', 'bf16', 'fp16' or None), `reason` says why.

    `step_seconds` holds the probe's timing of one step per candidate mode when auto measured."""

    mode: str | None
    reason: str
    channels_last: bool
    step_seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        shown = {None: "as accelerate launch set it", "no": "fp32"}.get(self.mode, self.mode)
        layout = ", channels-last" if self.channels_last else ""
        return f"precision: {shown}{layout} ({self.reason})"

    def record(self) -> dict[str, object]:
        """What a checkpoint keeps, so that a resumed run computes as the run did."""
        return {"mode": self.mode, "reason": self.reason, "step_seconds": dict(self.step_seconds)}


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


def bf16_hardware(on_cuda: bool) -> str | None:
    """Why bf16 is worth measuring on this machine (its native bf16 hardware), or None where it is emulated."""
    if on_cuda:
        return f"{torch.cuda.get_device_name()} computes bf16 natively" if torch.cuda.is_bf16_supported() else None
    found = cpu_bf16_instructions()
    return f"this CPU has {' and '.join(found)}" if found else None


def pick_fastest(step_seconds: dict[str, float], margin: float = BF16_MARGIN) -> str:
    """'bf16' where its step is at least `margin` times faster than fp32's ('no'), else 'no'."""
    fp32, bf16 = step_seconds.get("no"), step_seconds.get("bf16")
    if fp32 is None or bf16 is None:
        return "no"
    return "bf16" if bf16 * margin <= fp32 else "no"


def time_candidates(measure: Callable[[str], float], candidates: list[str], min_rounds: int = PROBE_ROUNDS,
                    max_rounds: int = 12, budget_seconds: float = 1.0) -> dict[str, float]:
    """The fastest timed step per candidate. Rounds interleave the candidates (fp32, bf16, fp32, bf16, ...) so
    that a change of machine load falls on both; the first round is a warm-up and is not counted. Cheap steps
    get more rounds (up to `max_rounds`, while the probe has spent under `budget_seconds`), as their timings
    are the noisiest; an expensive step gets `min_rounds`."""
    timings: dict[str, list[float]] = {c: [] for c in candidates}
    spent, rounds = 0.0, 0
    while rounds < min_rounds or (rounds < max_rounds and spent < budget_seconds):
        for candidate in candidates:
            seconds = measure(candidate)
            spent += seconds
            if rounds > 0 or min_rounds == 1:
                timings[candidate].append(seconds)
        rounds += 1
    return {c: min(t) for c, t in timings.items()}


def choose_precision(requested: str, on_cuda: bool, channels_last: bool = True,
                     measure: Callable[[str], float] | None = None,
                     recorded: dict[str, object] | None = None) -> Precision:
    """Resolve `trainer.mixed_precision` (auto, no, bf16, fp16).

    For auto: the choice `recorded` in a resumed run's checkpoint if there is one; else the format
    `DMSSL_AUTO_PRECISION` forces; else fp32 where bf16 is emulated; else `measure(mode) -> seconds of one
    step` decides (`pick_fastest`). Without `measure`, auto falls back to the hardware check alone."""
    if requested == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return Precision(None, "accelerate launch --mixed_precision", channels_last)
    if requested != "auto":
        return Precision(requested, f"trainer.mixed_precision={requested}", channels_last)
    if recorded and recorded.get("mode") in ("no", "bf16"):
        timings = {str(k): float(v) for k, v in dict(recorded.get("step_seconds") or {}).items()}
        return Precision(str(recorded["mode"]), f"{recorded.get('reason', 'auto')}; kept from the run's checkpoint",
                         channels_last, timings)
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in ("no", "bf16"):
            raise ConfigError(f"{FORCE_ENV}={forced!r}; allowed: no, bf16 (or unset it to let auto measure)")
        return Precision(forced, f"auto: {FORCE_ENV}={forced}", channels_last)
    hardware = bf16_hardware(on_cuda)
    if hardware is None:
        where = "this GPU has no bf16" if on_cuda else "this CPU has no native bf16 (no AMX or AVX512_BF16)"
        return Precision("no", f"auto: {where}, where bf16 is slower than fp32", channels_last)
    if measure is None:
        return Precision("bf16", f"auto: {hardware}", channels_last)
    timings = time_candidates(measure, ["no", "bf16"])
    mode = pick_fastest(timings)
    shown = ", ".join(f"{'fp32' if m == 'no' else m} {1000 * s:.1f} ms" for m, s in timings.items())
    verdict = ("bf16 is faster" if mode == "bf16"
               else f"bf16 is not {round(100 * (BF16_MARGIN - 1))} % faster")
    return Precision(mode, f"auto: {hardware}; measured one step: {shown}; {verdict}", channels_last, timings)


class Stopwatch:
    """Seconds of a block; waits for a GPU's queued work at both ends so that the time is the work's."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.started
