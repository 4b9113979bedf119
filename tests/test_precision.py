"""Number formats: what `trainer.mixed_precision=auto` picks, where fp32 is kept, channels-last and compile runs."""

import json
import shutil

import pytest
import torch

import dmssl.precision as precision
from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.distances import Distance
from dmssl.errors import ConfigError
from dmssl.model import SSLModel
from dmssl.recipe import resolve
from dmssl.trainer import fit
from modalities.image import SmallCNN

FAST = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "data.batch_size=8", "data.mu=2",
        "trainer.save_embeddings=false"]


@pytest.fixture
def unforced(monkeypatch):
    """auto as a user gets it: neither the launcher's nor the suite's forcing variable is set."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)


def injected(seconds: dict[str, float]):
    """A probe that reports fixed step times and records the order it was asked in."""
    asked: list[str] = []

    def measure(mode: str) -> float:
        asked.append(mode)
        return seconds[mode]

    return measure, asked


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [
    (0.200, 0.100, "bf16"),   # bf16 twice as fast (the CIFAR-10 CNN on an AMX CPU)
    (0.100, 0.210, "no"),     # bf16 twice as slow (the quickstart's tiny CNN on the same CPU)
    (0.100, 0.095, "no"),     # 5 % faster: inside the margin, a tie goes to fp32
    (0.100, 0.100 / precision.BF16_MARGIN, "bf16"),  # exactly the margin
])
def test_auto_picks_the_faster_format_by_a_clear_margin(unforced, monkeypatch, fp32, bf16, expected):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["amx_bf16"])
    measure, asked = injected({"no": fp32, "bf16": bf16})
    chosen = precision.choose_precision("auto", on_cuda=False, measure=measure)
    assert chosen.mode == expected
    assert chosen.step_seconds == {"no": fp32, "bf16": bf16}
    assert "amx_bf16" in chosen.reason and "measured one step" in chosen.reason
    # interleaved rounds, a warm-up first, at least PROBE_ROUNDS of each
    assert asked[:4] == ["no", "bf16", "no", "bf16"] and asked.count("no") == asked.count("bf16") >= precision.PROBE_ROUNDS


def test_probe_takes_the_fastest_timed_round_and_ignores_the_warm_up():
    times = iter([5.0, 5.0, 0.3, 0.2, 0.1, 0.25])  # warm-up (slow), then two timed rounds
    timings = precision.time_candidates(lambda mode: next(times), ["no", "bf16"], min_rounds=3, budget_seconds=0)
    assert timings == {"no": 0.1, "bf16": 0.2}


def test_cheap_steps_get_more_rounds_within_the_budget():
    calls = []
    precision.time_candidates(lambda mode: calls.append(mode) or 0.001, ["no", "bf16"], max_rounds=12, budget_seconds=1)
    assert len(calls) == 24  # 12 rounds of two: the budget was never reached
    calls.clear()
    precision.time_candidates(lambda mode: calls.append(mode) or 1.0, ["no", "bf16"], budget_seconds=1)
    assert len(calls) == 2 * precision.PROBE_ROUNDS


def test_auto_without_native_bf16_is_fp32_without_measuring(unforced, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: [])
    measure, asked = injected({"no": 1.0, "bf16": 0.1})
    chosen = precision.choose_precision("auto", on_cuda=False, measure=measure)
    assert chosen.mode == "no" and "no native bf16" in chosen.reason and asked == []
    assert "fp32" in chosen.describe()


def test_resumed_run_keeps_the_recorded_choice_without_measuring(unforced, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    measure, asked = injected({"no": 1.0, "bf16": 0.1})
    recorded = {"mode": "no", "reason": "auto: measured", "step_seconds": {"no": 0.1, "bf16": 0.2}}
    chosen = precision.choose_precision("auto", on_cuda=False, measure=measure, recorded=recorded)
    assert chosen.mode == "no" and asked == [] and "kept from the run's checkpoint" in chosen.reason


def test_forcing_variable_decides_auto_and_rejects_other_values(unforced, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: [])
    monkeypatch.setenv(precision.FORCE_ENV, "bf16")
    assert precision.choose_precision("auto", on_cuda=False).mode == "bf16"
    assert precision.choose_precision("no", on_cuda=False).mode == "no"  # an explicit setting still wins
    monkeypatch.setenv(precision.FORCE_ENV, "fp64")
    with pytest.raises(ConfigError, match="fp64.*allowed: no, bf16"):
        precision.choose_precision("auto", on_cuda=False)


def test_explicit_choice_and_accelerate_launch_win_over_auto(unforced, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: [])
    assert precision.choose_precision("bf16", on_cuda=False).mode == "bf16"
    assert precision.choose_precision("no", on_cuda=False, channels_last=False).channels_last is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    chosen = precision.choose_precision("auto", on_cuda=False)
    assert chosen.mode is None and "accelerate launch" in chosen.describe()


def test_auto_run_measures_records_and_resume_keeps_the_choice_bit_identically(unforced, monkeypatch, tmp_path):
    # The real probe times the run's real first step; its timings are then replaced by injected ones, so that
    # the choice (bf16 here) is the same on any CPU. The run with the probe equals one with bf16 set by hand:
    # the probe works on copies of the model and leaves the RNG as it found it.
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["amx_bf16"])
    real_time = precision.time_candidates
    seen: dict[str, float] = {}

    def timed_then_injected(measure, candidates, **options):
        seen.update(real_time(measure, candidates, **options))
        return {"no": 0.2, "bf16": 0.1}

    monkeypatch.setattr(precision, "time_candidates", timed_then_injected)
    steps = [*FAST, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5"]
    summary = fit(resolve([*steps, f"output_dir={tmp_path / 'auto'}"]))
    assert summary["mixed_precision"] == "bf16" and summary["precision_step_seconds"] == {"no": 0.2, "bf16": 0.1}
    assert set(seen) == {"no", "bf16"} and all(s > 0 for s in seen.values())  # the real step was timed
    by_hand = fit(resolve([*steps, "trainer.mixed_precision=bf16", f"output_dir={tmp_path / 'by_hand'}"]))
    assert summary["test_accuracy"] == by_hand["test_accuracy"]
    # resumed from step 2: no new probe (it would now pick fp32), the same weights as the straight run
    monkeypatch.setattr(precision, "time_candidates", lambda *a, **o: pytest.fail("a resumed run measured again"))
    shutil.copytree(tmp_path / "auto", tmp_path / "resumed")
    for path in list_checkpoints(tmp_path / "resumed" / "checkpoints")[1:]:
        path.unlink()
    resumed = fit(resolve([*steps, f"output_dir={tmp_path / 'resumed'}", "resume=auto"]))
    assert resumed["mixed_precision"] == "bf16" and "kept from the run's checkpoint" in resumed["precision_reason"]
    a = load_checkpoint(list_checkpoints(tmp_path / "auto" / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    # flip a discrete choice (a pseudo-label's argmax) and grow from there. fp32 pinned: the tolerance is
    # fp32's, and bf16 (which auto may pick) rounds each product to 8 bits of mantissa.
    pinned = [*FAST, "trainer.max_steps=1", "trainer.mixed_precision=no"]
    on = fit(resolve([*pinned, f"output_dir={tmp_path / 'on'}"]))
    off = fit(resolve([*pinned, "trainer.channels_last=false", f"output_dir={tmp_path / 'off'}"]))
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
