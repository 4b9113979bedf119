"""Audio modality: waveforms in, log-mel spectrograms computed in the encoder, a small spectrogram ResNet.

Samples are mono float waveforms at `sample_rate`, cropped or zero-padded to `clip_seconds`. Views
work on waveforms in DataLoader workers; the mel spectrogram is part of the encoder, so it runs on the
training device (a GPU does that work when there is one).

    weak    random circular time shift (up to `max_shift_fraction` of the clip) and gain (+-`gain_db`)
    strong  weak + speed perturbation (resampling, +-`speed_range`) + a quiet mix with another clip of
            the data (`mix_level`) + noise at a random SNR in `snr_db` + SpecAugment-style masks: a time
            mask (zeroed samples) and a frequency mask (a band removed in the Fourier domain)

Data (`data.dataset`):
    folder           `data.root` = a folder or .tar.gz of audio files (.wav, .flac, .ogg); the label is
                     the parent folder's name, or the first group of `modality.label_pattern` on the file
                     name (e.g. `^(\\d)_` for the Free Spoken Digit Dataset). Files under train/ and test/
                     folders, or whose name matches `modality.test_pattern`, form the test set; otherwise
                     a seeded `test_fraction` of the files.
    speechcommands   torchaudio's Speech Commands v2 (downloaded where the internet is reachable, into
                     data.cache_dir, or read from data.root), its own validation/test lists.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmssl.errors import ConfigError, DataError
from dmssl.files import extract_tar_safely, iter_data_files
from dmssl.modality import Modality, RawData, check_pattern, group_of

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass
class AudioOptions:
    """`modality:` keys of the audio adapter."""

    sample_rate: int = 8000
    clip_seconds: float = 1.0
    n_mels: int = 64
    n_fft: int = 512
    hop_ms: float = 10.0
    label_pattern: str | None = None  # regex on file names whose first group is the class (else: the folder)
    test_pattern: str | None = None  # regex on file names that marks test files
    group_pattern: str | None = None  # regex whose first group names a file's group (e.g. its speaker), for data.*_groups
    test_fraction: float = 0.2  # seeded test share when neither folders nor test_pattern say
    max_shift_fraction: float = 0.1
    gain_db: float = 6.0
    speed_range: float = 0.1  # strong: speed factor in [1 - r, 1 + r]; 0 turns it off
    mix_level: float = 0.2  # strong: amplitude of another clip mixed in; 0 turns it off
    snr_db: list[float] | None = None  # strong: noise SNR range in dB; default [10, 30]
    time_mask_fraction: float = 0.15  # strong: longest time mask, as a fraction of the clip
    freq_mask_fraction: float = 0.15  # strong: widest frequency mask, as a fraction of the band
    audio_column: str = "audio"  # data.dataset=hf: the column of clips (a datasets.Audio feature, or bytes/paths)
    label_column: str = "label"  # data.dataset=hf: the column of class labels

    def validate(self) -> None:
        if self.sample_rate < 1000:
            raise ConfigError(f"modality.sample_rate={self.sample_rate} must be >= 1000")
        if self.clip_seconds <= 0:
            raise ConfigError(f"modality.clip_seconds={self.clip_seconds} must be > 0")
        if self.n_mels < 8 or self.n_fft < 32:
            raise ConfigError("modality.n_mels must be >= 8 and modality.n_fft >= 32")
        for key in ("test_fraction", "max_shift_fraction", "speed_range", "mix_level", "time_mask_fraction",
                    "freq_mask_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"modality.{key}={getattr(self, key)} must be in [0, 1)")
        check_pattern("label_pattern", self.label_pattern, "the class", r"'^(\d)_'")
        check_pattern("group_pattern", self.group_pattern, "the group name", r"'^\d_([a-z]+)_'")
        check_pattern("test_pattern", self.test_pattern)
        if self.snr_db is not None and (len(self.snr_db) != 2 or self.snr_db[0] > self.snr_db[1]):
            raise ConfigError(f"modality.snr_db={self.snr_db} must be [low, high]")


class AudioModality(Modality):
    """Mono waveforms of fixed length; encoder `spec_resnet` (log-mel + small ResNet)."""

    Options = AudioOptions
    encoders = ("spec_resnet",)
    renamed_keys = {"data.label_pattern": "modality.label_pattern"}
    # Spectrogram-CNN embeddings are unit-norm like the image ones: multi-bandwidth Gaussian MMD.
    defaults = {"model": {"encoder": "spec_resnet"},
                "distance": {"kernel": "gaussian", "median_scales": [0.5, 1.0, 2.0]}}

    input_suffixes = AUDIO_SUFFIXES

    def __init__(self, options: AudioOptions | None, data: Any, model: Any) -> None:
        super().__init__(options or AudioOptions(), data, model)
        self.mix_bank: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(round(self.options.sample_rate * self.options.clip_seconds))

    # ---------------------------------------------------------------- data

    def load(self) -> RawData:
        if self.options.group_pattern is not None and self.data.dataset != "folder":
            raise ConfigError(f"modality.group_pattern works on file names, with data.dataset=folder; "
                              f"data.dataset={self.data.dataset!r} has none")
        if self.data.dataset == "speechcommands":
            raw = load_speech_commands(self.data.root, self.data.cache_dir, self.options.sample_rate, self.num_samples)
        elif self.data.dataset == "hf":
            raw = load_hf_audio(self.data, self.options, self.num_samples)
        elif self.data.dataset == "folder":
            if not self.data.root:
                raise DataError("data.dataset=folder needs data.root: a folder or .tar.gz of audio files")
            raw = load_audio_folder(Path(self.data.root), self.options, self.options.label_pattern, self.num_samples)
        else:
            raise ConfigError(f"data.dataset={self.data.dataset!r} is not an audio source; allowed: folder, speechcommands, hf")
        # A fixed, seeded bank of training clips for the strong view's mixing (workers inherit it).
        bank = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(0))[:256]
        self.mix_bank = torch.stack([raw.train[int(i)] for i in bank])
        return raw

    # ---------------------------------------------------------------- new samples for a trained model

    def samples_from(self, values: Any) -> list[torch.Tensor]:
        """Waveforms at `sample_rate`: 1-D arrays or tensors, or (channels, frames) averaged to mono; each
        cropped or zero-padded to `clip_seconds`, as the training clips were."""
        samples = []
        for i, value in enumerate(values):
            wave = torch.as_tensor(value).float()
            if wave.ndim == 2:
                wave = wave.mean(dim=0 if wave.shape[0] <= wave.shape[1] else 1)
            if wave.ndim != 1 or wave.numel() == 0 or not torch.isfinite(wave).all():
                raise DataError(f"sample {i}: a waveform must be a non-empty, finite 1-D (or channels x frames) array; "
                                f"got shape {tuple(wave.shape)}")
            samples.append(fit_length(wave, self.num_samples))
        return samples

    def read_inputs(self, path: Path) -> list[torch.Tensor]:
        try:
            wave = decode_audio(path.read_bytes(), self.options.sample_rate)
        except Exception as err:  # soundfile raises several types for broken files
            raise DataError(f"{path} is not a readable audio file ({type(err).__name__}: {err})") from None
        if wave.numel() == 0:
            raise DataError(f"{path} holds no audio")
        return self.samples_from([wave])

    # ---------------------------------------------------------------- views

    def weak(self, wave: torch.Tensor) -> torch.Tensor:
        """Random circular shift and gain."""
        opts = self.options
        limit = int(opts.max_shift_fraction * wave.shape[-1])
        shift = random.randint(-limit, limit) if limit else 0
        gain = 10 ** (random.uniform(-opts.gain_db, opts.gain_db) / 20)
        return torch.roll(wave, shift) * gain

    def strong(self, wave: torch.Tensor) -> torch.Tensor:
        """Weak, then speed perturbation, mixing, noise at a random SNR, and time and frequency masks."""
        opts = self.options
        wave = self.weak(wave)
        if opts.speed_range:
            wave = change_speed(wave, random.uniform(1 - opts.speed_range, 1 + opts.speed_range))
        if opts.mix_level and self.mix_bank is not None and len(self.mix_bank):
            other = self.mix_bank[random.randrange(len(self.mix_bank))]
            wave = wave + opts.mix_level * random.random() * other * (rms(wave) / rms(other))
        low, high = opts.snr_db or [10.0, 30.0]
        snr = random.uniform(low, high)
        wave = wave + torch.randn(wave.shape) * rms(wave) / (10 ** (snr / 20))
        wave = time_mask(wave, opts.time_mask_fraction)
        return frequency_mask(wave, opts.freq_mask_fraction)

    def collate(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([fit_length(v, self.num_samples) for v in views])

    # ---------------------------------------------------------------- encoder

    def build_encoder(self) -> nn.Module:
        if self.model.encoder != "spec_resnet":
            raise ConfigError(f"model.encoder={self.model.encoder!r} is not an audio encoder; allowed: spec_resnet")
        opts = self.options
        return SpectrogramResNet(opts.sample_rate, opts.n_fft, int(opts.sample_rate * opts.hop_ms / 1000), opts.n_mels,
                                 width=self.model.width or 32, depth=self.model.depth or 1)


def rms(wave: torch.Tensor) -> torch.Tensor:
    return wave.pow(2).mean().sqrt().clamp_min(1e-5)


def fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Centre-crop or zero-pad (at the end) to `length` samples."""
    if wave.shape[-1] > length:
        start = (wave.shape[-1] - length) // 2
        return wave[..., start: start + length]
    return F.pad(wave, (0, length - wave.shape[-1]))


def change_speed(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play `factor` times faster (pitch moves with it), by linear resampling; length is kept."""
    length = wave.shape[-1]
    resampled = F.interpolate(wave.view(1, 1, -1), size=max(2, int(round(length / factor))), mode="linear",
                              align_corners=False).view(-1)
    return fit_length(resampled, length)


def time_mask(wave: torch.Tensor, max_fraction: float) -> torch.Tensor:
    width = int(random.uniform(0, max_fraction) * wave.shape[-1])
    if width == 0:
        return wave
    start = random.randrange(wave.shape[-1] - width + 1)
    wave = wave.clone()
    wave[start: start + width] = 0
    return wave


def frequency_mask(wave: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """Remove one random frequency band (SpecAugment's frequency mask, applied before the spectrogram)."""
    spectrum = torch.fft.rfft(wave)
    width = int(random.uniform(0, max_fraction) * spectrum.shape[-1])
    if width == 0:
        return wave
    start = random.randrange(spectrum.shape[-1] - width + 1)
    spectrum[start: start + width] = 0
    return torch.fft.irfft(spectrum, n=wave.shape[-1])


# ---------------------------------------------------------------- loading


def decode_audio(data: bytes, sample_rate: int) -> torch.Tensor:
    """Bytes of a WAV/FLAC/OGG file -> mono float32 waveform at `sample_rate`."""
    import soundfile
    import torchaudio.functional as AF

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = torch.from_numpy(samples).mean(dim=1)  # (frames, channels) -> mono
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave


def load_audio_folder(root: Path, opts: AudioOptions, label_pattern: str | None, length: int) -> RawData:
    """Audio files with labels from folders or file names; unreadable or empty files are skipped and counted."""
    if not root.exists():
        raise DataError(f"data.root={str(root)!r} does not exist; expected a folder or .tar.gz of audio files")
    pattern = re.compile(label_pattern) if label_pattern else None
    test_pattern = re.compile(opts.test_pattern) if opts.test_pattern else None
    group_pattern = re.compile(opts.group_pattern) if opts.group_pattern else None
    items: list[tuple[torch.Tensor, str, str | None, str | None]] = []  # (wave, label, split from folders, group)
    skipped = unlabeled_names = 0
    for parts, data in iter_data_files(root, AUDIO_SUFFIXES):
        name = parts[-1]
        if pattern is not None:
            match = pattern.search(name)
            if not match or not match.groups():
                unlabeled_names += 1
                continue
            label = match.group(1)
        else:
            if len(parts) < 2:
                raise DataError(f"{name} is not in a class folder; put files in <class>/ folders or set modality.label_pattern")
            label = parts[-2]
        group = group_of(group_pattern, name) if group_pattern is not None else None  # before decoding: fails fast
        try:
            wave = decode_audio(data, opts.sample_rate)
        except Exception:  # soundfile raises several types for broken files
            skipped += 1
            continue
        if wave.numel() == 0 or not torch.isfinite(wave).all():
            skipped += 1
            continue
        split = "test" if (test_pattern and test_pattern.search(name)) or "test" in parts[:-1] else \
            "train" if "train" in parts[:-1] or test_pattern else None
        items.append((fit_length(wave, length), label, split, group))
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable or empty audio files under {root}", stacklevel=2)
    if unlabeled_names:
        warnings.warn(f"skipped {unlabeled_names} files whose names do not match modality.label_pattern={label_pattern!r}",
                      stacklevel=2)
    if not items:
        raise DataError(f"no readable, labeled audio files under {root} (skipped {skipped} unreadable, "
                        f"{unlabeled_names} not matching modality.label_pattern)")
    classes = sorted({label for _, label, _, _ in items}, key=lambda c: (len(c), c))
    index = {c: i for i, c in enumerate(classes)}
    if all(split is None for _, _, split, _ in items):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
        test_ids = set(order[: max(1, int(round(opts.test_fraction * len(items))))])
        items = [(w, c, "test" if i in test_ids else "train", g) for i, (w, c, _, g) in enumerate(items)]
    train = [(w, index[c], g) for w, c, s, g in items if s != "test"]
    test = [(w, index[c], g) for w, c, s, g in items if s == "test"]
    if not train or not test:
        raise DataError(f"the split of {root} left {len(train)} training and {len(test)} test files; check modality.test_pattern")
    grouped = group_pattern is not None
    return RawData(train=[w for w, _, _ in train], train_labels=[y for _, y, _ in train], test=[w for w, _, _ in test],
                   test_labels=[y for _, y, _ in test], class_names=classes,
                   train_groups=[g for _, _, g in train] if grouped else None,
                   test_groups=[g for _, _, g in test] if grouped else None)


def load_hf_audio(data: Any, opts: AudioOptions, length: int) -> RawData:
    """data.dataset=hf: the audio column as encoded bytes (datasets.Audio(decode=False)), decoded with soundfile
    and resampled here, so no extra decoding backend is needed."""
    import datasets

    from dmssl.hf_data import decode_encoded, hf_columns

    columns = hf_columns(data, opts.audio_column, opts.label_column, datasets.Audio(decode=False))

    def decode(values: list[Any], split: str) -> list[torch.Tensor]:
        return decode_encoded(values, lambda b: fit_length(decode_audio(b, opts.sample_rate), length), opts.audio_column,
                              split, "audio")

    return RawData(train=decode(columns.train, "train"), train_labels=columns.train_labels,
                   test=decode(columns.test, "test"), test_labels=columns.test_labels, class_names=columns.class_names,
                   unlabeled=decode(columns.unlabeled, "unlabeled"))


def load_speech_commands(root: str | None, cache_dir: str | None, sample_rate: int, length: int) -> RawData:
    """Speech Commands v2 via torchaudio's reader, in `root` (or the cache folder).

    The archive is downloaded where the internet is reachable (checked against torchaudio's checksum) and
    unpacked by `extract_tar_safely`, never by torchaudio's own extraction, which writes members with
    absolute or `../` paths wherever they point."""
    from torchaudio.datasets import SPEECHCOMMANDS
    from torchaudio.datasets import speechcommands as reader

    folder = Path(root or Path(cache_dir or Path.home() / ".cache" / "dmssl") / "speechcommands")
    name = "speech_commands_v0.02"
    unpacked, archive = folder / "SpeechCommands" / name, folder / f"{name}.tar.gz"
    if not unpacked.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            url = f"http://download.tensorflow.org/data/{name}.tar.gz"
            try:
                from torch.hub import download_url_to_file

                download_url_to_file(url, str(archive), hash_prefix=getattr(reader, "_CHECKSUMS", {}).get(url))
            except Exception as err:  # URLError and friends: not reachable
                raise DataError(f"Speech Commands is not in {folder} and could not be downloaded ({type(err).__name__}); "
                                "offline, use data.dataset=folder with data.root=<folder of <word>/*.wav>") from None
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        extract_tar_safely(archive, unpacked)
    try:
        train = SPEECHCOMMANDS(str(folder), download=False, subset="training")
        test = SPEECHCOMMANDS(str(folder), download=False, subset="testing")
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{unpacked} is not a Speech Commands v2 folder ({type(err).__name__}: {err})") from None

    def read(dataset: Any) -> tuple[list[torch.Tensor], list[str]]:
        waves, words = [], []
        for i in range(len(dataset)):
            wave, rate, word, *_ = dataset[i]
            wave = wave.mean(0)
            if rate != sample_rate:
                import torchaudio.functional as AF

                wave = AF.resample(wave, rate, sample_rate)
            waves.append(fit_length(wave, length).to(torch.float16))
            words.append(word)
        return waves, words

    train_waves, train_words = read(train)
    test_waves, test_words = read(test)
    classes = sorted(set(train_words))
    index = {c: i for i, c in enumerate(classes)}
    return RawData(train=train_waves, train_labels=[index[w] for w in train_words], test=test_waves,
                   test_labels=[index[w] for w in test_words], class_names=classes)


# ---------------------------------------------------------------- encoder


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SpectrogramResNet(nn.Module):
    """(B, T) waveforms -> log-mel (B, 1, n_mels, frames) -> stride-2 stem -> ResNet stages (w, 2w, 4w; `depth` blocks each) -> (B, 4w)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, width: int = 32,
                 depth: int = 1) -> None:
        super().__init__()
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                        n_mels=n_mels, f_max=sample_rate / 2)
        self.input_norm = nn.BatchNorm2d(1)
        # A stride-2 stem halves both axes first: full-resolution convolutions at narrow widths cost most
        # of the time on CPUs and add little for keyword-length clips.
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        channels = width
        for stage, out in enumerate([width, 2 * width, 4 * width]):
            for block in range(depth):
                layers.append(_Block(channels, out, stride=2 if block == 0 and stage > 0 else 1))
                channels = out
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels

    def spectrogram(self, waves: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrogram, (B, 1, n_mels, frames); computed in float32 for stable logs."""
        with torch.autocast(device_type=waves.device.type, enabled=False):
            mel = self.mel(waves.float())
        return torch.log(mel + 1e-6).unsqueeze(1)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(self.spectrogram(waves))
        return self.body(x).mean(dim=(2, 3))

