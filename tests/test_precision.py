"""Number formats: what `trainer.mixed_precision=auto` picks, where fp32 is kept, channels-last and compile runs."""

import json
import shutil

import pytest
import torch

import dmssl.precision as precision
from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.distances import Distance
from dmssl.model import SSLModel
from dmssl.recipe import resolve
from dmssl.trainer import fit
from modalities.image import SmallCNN

FAST = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "data.batch_size=8", "data.mu=2",
        "trainer.save_embeddings=false"]


def test_auto__bf16_on_a_cpu_with_native_bf16_and_fp32_without(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["amx_bf16"])
    chosen = precision.choose_precision("auto", on_cuda=False)
    assert chosen.mode == "bf16" and "amx_bf16" in chosen.reason
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: [])
    chosen = precision.choose_precision("auto", on_cuda=False)
    assert chosen.mode == "no" and "no native bf16" in chosen.reason
    assert "fp32" in chosen.describe()


def test_explicit_choice_and_accelerate_launch_win_over_auto(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: [])
    assert precision.choose_precision("bf16", on_cuda=False).mode == "bf16"
    assert precision.choose_precision("no", on_cuda=False, channels_last=False).channels_last is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    chosen = precision.choose_precision("auto", on_cuda=False)
    assert chosen.mode is None and "accelerate launch" in chosen.describe()


def test_cpu_probe_reports_only_known_flags():
    assert set(precision.cpu_bf16_instructions()) <= set(precision.CPU_BF16_FLAGS)


def test_model_returns_fp32_embeddings_under_bf16_autocast():
    model = SSLModel(SmallCNN(in_channels=1, width=8), num_classes=3).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encoder(images)
        z = model(images)
    assert features.dtype == torch.bfloat16  # the encoder did run in bf16 ...
    assert z.dtype == torch.float32  # ... and what the losses see is fp32
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


class RecordingDistance(Distance):
    """Wraps a real distance and records the dtype and autocast state it was called under."""

    calls: list[tuple[torch.dtype, bool]] = []

    def __init__(self, inner: Distance) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, y, generator=None):
        RecordingDistance.calls.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return self.inner(x, y, generator=generator) if generator is not None else self.inner(x, y)


def test_bf16_run__losses_and_distance_stay_fp32(tmp_path, monkeypatch):
    import dmssl.objective as objective_module

    real_build = objective_module.build_distance
    monkeypatch.setattr(objective_module, "build_distance", lambda *a, **o: RecordingDistance(real_build(*a, **o)))
    RecordingDistance.calls = []
    summary = fit(resolve([*FAST, "trainer.max_steps=4", "trainer.mixed_precision=bf16", f"output_dir={tmp_path}"]))
    assert summary["mixed_precision"] == "bf16" and summary["precision_reason"] == "trainer.mixed_precision=bf16"
    assert RecordingDistance.calls and all(dtype == torch.float32 and not autocast
                                           for dtype, autocast in RecordingDistance.calls)
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(isinstance(line["loss"], float) for line in lines)


def test_channels_last_run_keeps_nhwc_weights_and_records_the_choice(tmp_path):
    summary = fit(resolve([*FAST, "trainer.max_steps=3", f"output_dir={tmp_path}"]))
    assert summary["channels_last"] is True and 0.0 <= summary["data_wait_share"] <= 1.0
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    convs = [v for k, v in state["model"].items() if v.ndim == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # NHWC, not the default layout


def test_channels_last_off_gives_the_same_run_up_to_float_error(tmp_path):
    # One step: the layouts sum in different orders, and from the second step on a float-error difference can
    # flip a discrete choice (a pseudo-label's argmax) and grow from there.
    on = fit(resolve([*FAST, "trainer.max_steps=1", f"output_dir={tmp_path / 'on'}"]))
    off = fit(resolve([*FAST, "trainer.max_steps=1", "trainer.channels_last=false", f"output_dir={tmp_path / 'off'}"]))
    a = load_checkpoint(list_checkpoints(tmp_path / "on" / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "off" / "checkpoints")[-1])["model"]
    assert off["channels_last"] is False
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-5), key
    assert abs(on["test_accuracy"] - off["test_accuracy"]) <= 0.01


@pytest.mark.slow
def test_compiled_encoder_trains_and_checkpoints_keep_plain_names(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on a CPU needs a C compiler (cc or gcc) on PATH")
    summary = fit(resolve([*FAST, "trainer.max_steps=3", "trainer.compile=true", f"output_dir={tmp_path}"]))
    assert summary["compiled"] is True and summary["steps"] == 3
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert not any("_orig_mod" in key for key in state["model"])
    reference = SSLModel(SmallCNN(in_channels=1, width=32), num_classes=10).state_dict()
    assert set(state["model"]) == set(reference)
