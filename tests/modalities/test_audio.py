"""Audio adapter: loading (rates, channels, lengths, labels from names), views, spectrogram shapes."""

import io
import tarfile

import numpy as np
import pytest
import soundfile
import torch

from dmssl.config import DataConfig, ModelConfig
from dmssl.data import seeded_rng
from dmssl.errors import DataError
from modalities.audio import AudioModality, AudioOptions, change_speed, decode_audio, fit_length, frequency_mask


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A synthetic sine tone (test data, not a recording)."""
    t = np.arange(int(rate * seconds)) / rate
    signal = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([signal] * channels, axis=1) if channels > 1 else signal


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def test_decode__resamples_and_mixes_to_mono():
    stereo = decode_audio(wav_bytes(tone(16000, 0.5, channels=2), 16000), 8000)
    assert stereo.dim() == 1 and stereo.shape[0] == 4000
    mono = decode_audio(wav_bytes(tone(22050, 0.25), 22050), 8000)
    assert mono.shape[0] == 2000
    assert float(mono.abs().max()) == pytest.approx(0.5, abs=0.05)


def test_fit_length__pads_short_and_crops_long():
    assert torch.equal(fit_length(torch.ones(3), 5), torch.tensor([1.0, 1, 1, 0, 0]))
    assert fit_length(torch.arange(10.0), 4).tolist() == [3.0, 4.0, 5.0, 6.0]


def make_folder(root, broken: bool = False):
    """Synthetic FSDD-like names: {digit}_{speaker}_{index}.wav with tones whose pitch depends on the digit."""
    root.mkdir()
    for digit in range(3):
        for index in range(6):
            rate = 8000 if index % 2 else 16000
            (root / f"{digit}_anna_{index}.wav").write_bytes(wav_bytes(tone(rate, 0.3 + 0.1 * index, freq=300 + 200 * digit), rate))
    (root / "notes.txt").write_text("not audio")
    if broken:
        (root / "9_anna_0.wav").write_bytes(b"RIFF not really a wav")
    return root


def adapter(root, **options) -> AudioModality:
    opts = AudioOptions(test_pattern=r"_[0-1]\.wav$", label_pattern=r"^(\d)_", **options)
    return AudioModality(opts, DataConfig(dataset="folder", root=str(root)), ModelConfig(encoder="spec_resnet"))


def test_load__labels_from_file_names_and_test_pattern(tmp_path):
    raw = adapter(make_folder(tmp_path / "clips")).load()
    assert raw.class_names == ["0", "1", "2"]
    assert len(raw.test) == 6 and len(raw.train) == 12
    assert all(w.shape == (8000,) for w in raw.train + raw.test)
    assert sorted(raw.train_labels) == [0] * 4 + [1] * 4 + [2] * 4


def test_load__groups_from_file_names(tmp_path):
    root = make_folder(tmp_path / "clips")
    for index in range(2, 4):
        (root / f"0_bob_{index}.wav").write_bytes(wav_bytes(tone(8000, 0.3, freq=300), 8000))
    raw = adapter(root, group_pattern=r"^\d_([a-z]+)_").load()
    assert sorted(raw.train_groups) == ["anna"] * 12 + ["bob"] * 2 and raw.test_groups == ["anna"] * 6
    assert adapter(root).load().train_groups is None
    (root / "0_Carl_2.wav").write_bytes(wav_bytes(tone(8000, 0.3, freq=300), 8000))
    with pytest.raises(DataError, match=r"0_Carl_2.wav does not match modality.group_pattern"):
        adapter(root, group_pattern=r"^\d_([a-z]+)_").load()


def test_load__tar_gz_and_unreadable_files_are_counted(tmp_path):
    folder = make_folder(tmp_path / "clips", broken=True)
    archive = tmp_path / "clips.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="recordings")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        raw = adapter(archive).load()
    assert len(raw.train) + len(raw.test) == 18


def test_load__missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        adapter(tmp_path / "nowhere").load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable, labeled audio files"):
        adapter(tmp_path / "empty").load()


def test_views__seeded_shapes_and_different_from_input(tmp_path):
    a = adapter(make_folder(tmp_path / "clips"))
    raw = a.load()
    clip = raw.train[0]
    with seeded_rng(3):
        first = [a.weak(clip), a.strong(clip)]
    with seeded_rng(3):
        second = [a.weak(clip), a.strong(clip)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert all(v.shape == clip.shape and torch.isfinite(v).all() for v in first)
    assert not torch.equal(first[1], clip)


def test_change_speed_and_frequency_mask_keep_length():
    x = torch.randn(800)
    assert change_speed(x, 1.1).shape == (800,) and change_speed(x, 0.9).shape == (800,)
    torch.manual_seed(0)
    import random

    random.seed(1)
    masked = frequency_mask(x, 0.5)
    assert masked.shape == x.shape


def test_encoder__spectrogram_and_feature_shapes():
    a = AudioModality(AudioOptions(n_mels=32, n_fft=256), DataConfig(), ModelConfig(encoder="spec_resnet", width=8))
    encoder = a.build_encoder()
    waves = a.collate([torch.randn(8000), torch.randn(5000)])
    assert waves.shape == (2, 8000)
    assert encoder.spectrogram(waves).shape == (2, 1, 32, 101)
    features = encoder(waves)
    assert features.shape == (2, encoder.feature_dim) == (2, 32)


@pytest.mark.slow
def test_end_to_end__tiny_audio_run(tmp_path):
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    root = make_folder(tmp_path / "clips")
    summary = fit(resolve(["recipe=audio_fsdd", f"data.root={root}", "modality.test_pattern=_[0-1]\\.wav$",
                           "data.labels_per_class=2", "data.batch_size=4", "data.mu=2", "data.num_workers=0",
                           "model.width=8", "trainer.max_steps=6", "trainer.eval_every=3",
                           "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 6 and summary["num_test"] == 6 and 0 <= summary["test_accuracy"] <= 1


def test_conformance_kit_passes(tmp_path):
    from dmssl.testing import check_adapter

    assert check_adapter(adapter(make_folder(tmp_path / "clips")), num_samples=8).passed


def test_read_inputs_and_samples_from__clips_of_any_rate_become_clip_length_waveforms(tmp_path):
    audio = adapter(tmp_path, clip_seconds=0.5)
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(tone(16000, 0.2, channels=2), 16000))
    (wave,) = audio.read_inputs(path)
    assert wave.shape == (4000,)  # 0.5 s at 8 kHz; the 0.2 s clip was resampled and zero-padded
    assert torch.allclose(wave, fit_length(decode_audio(path.read_bytes(), 8000), 4000))
    stereo = audio.samples_from([np.stack([np.ones(3000), np.zeros(3000)])])[0]
    assert stereo.shape == (4000,) and torch.allclose(stereo[:3000], torch.full((3000,), 0.5))
    (tmp_path / "bad.wav").write_bytes(b"RIFF not a wav")
    with pytest.raises(DataError, match="bad.wav is not a readable audio file"):
        audio.read_inputs(tmp_path / "bad.wav")


@pytest.mark.slow
def test_hf_dataset__a_save_to_disk_folder_of_clips_trains_offline(tmp_path):
    """Synthetic tones as WAV bytes in a datasets.Audio column, string labels, a split of unlabeled clips."""
    import datasets

    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    def split(n, labeled=True):
        pitches = [i % 3 for i in range(n)]
        clips = [{"bytes": wav_bytes(tone(8000, 0.3, freq=300 + 200 * p), 8000), "path": None} for p in pitches]
        labels = [["low", "mid", "high"][p] if labeled else None for p in pitches]
        # Written as a plain bytes struct and cast: encoding through datasets.Audio itself needs torchcodec.
        struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
        plain = datasets.Dataset.from_dict({"audio": clips, "word": labels},
                                           features=datasets.Features({"audio": struct, "word": datasets.Value("string")}))
        return plain.cast_column("audio", datasets.Audio(decode=False))

    datasets.DatasetDict({"train": split(18), "test": split(6), "extra": split(9, labeled=False)}).save_to_disk(tmp_path / "hf")
    summary = fit(resolve(["recipe=audio_fsdd", "data.dataset=hf", f"data.root={tmp_path / 'hf'}", "data.unlabeled_split=extra",
                           "modality.label_column=word", "modality.clip_seconds=0.3", "data.labels_per_class=2",
                           "data.batch_size=4", "data.mu=1", "data.num_workers=0", "model.width=8", "trainer.max_steps=3",
                           "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}"]))
    assert summary["class_names"] == ["high", "low", "mid"]  # string labels, sorted
    assert summary["num_test"] == 6 and summary["num_unlabeled"] == 18 + 9
