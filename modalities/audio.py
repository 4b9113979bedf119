"""Audio modality: waveforms in, log-mel spectrograms computed in the encoder; a small spectrogram ResNet
trained from scratch, or a pretrained speech encoder (`model.encoder=pretrained`, `modality.pretrained=`).

Samples are mono float waveforms at `sample_rate`, cropped or zero-padded to `clip_seconds`. Views
work on waveforms in DataLoader workers; the mel spectrogram is part of the encoder, so it runs on the
training device (a GPU does that work when there is one).

    weak    random circular time shift (up to `max_shift_fraction` of the clip) and gain (+-`gain_db`)
    strong  weak + speed perturbation (resampling, +-`speed_range`) + a quiet mix with another clip of
            the data (`mix_level`) + noise at a random SNR in `snr_db` + SpecAugment-style masks: a time
            mask (zeroed samples) and a frequency mask (a band removed in the Fourier domain)

Encoders (`model.encoder`):
    spec_resnet      log-mel + a small ResNet, from random weights
    pretrained       the encoder of a transformers speech model named by `modality.pretrained` (a hub name or a
                     local folder), mean-pooled over the frames that hold audio, its input made at its own
                     sampling rate (clips are resampled in the encoder):
                     - Whisper (`WhisperModel`'s encoder) on its own log-mel features. It was trained on 30-second
                       windows; it runs on the clip's own length here (`clip_seconds`): the positional embeddings
                       of the first frames are used, as for the start of any utterance.
                     - wav2vec2, HuBERT, WavLM, data2vec-audio (`AutoModel` + `AutoFeatureExtractor`) on the
                       waveform, normalised per clip as their feature extractor does.
                     `model.freeze`: none, all, or N = the stem (Whisper: its two convolutions and positional
                     embeddings; the others: the convolutional feature encoder and positional convolution) and
                     N-1 Transformer layers.

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
from dmssl.pretrained import local_files_only, split_mask_channel, with_mask_channel

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
    pretrained: str | None = None  # model.encoder=pretrained: a transformers speech model, hub name or local folder
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
    encoders = ("spec_resnet", "pretrained")
    renamed_keys = {"data.label_pattern": "modality.label_pattern"}
    # Spectrogram-CNN embeddings are unit-norm like the image ones: multi-bandwidth Gaussian MMD.
    defaults = {"model": {"encoder": "spec_resnet"},
                "distance": {"kernel": "gaussian", "median_scales": [0.5, 1.0, 2.0]}}

    input_suffixes = AUDIO_SUFFIXES

    def __init__(self, options: AudioOptions | None, data: Any, model: Any) -> None:
        super().__init__(options or AudioOptions(), data, model)
        self.mix_bank: torch.Tensor | None = None
        if getattr(model, "encoder", None) == "pretrained":
            if not self.options.pretrained:
                raise ConfigError("model.encoder=pretrained needs modality.pretrained: a transformers speech model "
                                  "(a hub name, or a local folder such as a save_pretrained copy of openai/whisper-tiny.en)")
            check_pretrained_speech_model(self.options.pretrained, getattr(model, "freeze", "none"))

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

    def export_encoder(self, encoder: nn.Module, folder: Path) -> bool:
        """A pretrained speech encoder as transformers writes it (`WhisperEncoder.from_pretrained(folder)` reads a
        Whisper one back, `AutoModel.from_pretrained(folder)` a waveform one), with the feature extractor's config
        beside it."""
        if not isinstance(encoder, (WhisperAudioEncoder, WaveformSpeechEncoder)):
            return False
        encoder.net.save_pretrained(folder)
        encoder.extractor.save_pretrained(folder)
        return True

    def use_exported_encoder(self, folder: Path) -> None:
        self.options.pretrained = str(folder)

    def build_encoder(self) -> nn.Module:
        if self.model.encoder == "pretrained":
            return pretrained_speech_encoder(self.options.pretrained or "", self.options.sample_rate)
        if self.model.encoder != "spec_resnet":
            raise ConfigError(f"model.encoder={self.model.encoder!r} is not an audio encoder; allowed: spec_resnet, pretrained")
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



# ---------------------------------------------------------------- pretrained speech encoders


def speech_model_config(name: str) -> Any:
    """The transformers config of `modality.pretrained` (config.json only: cheap, before any data loads)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=local_files_only(name))
    except (OSError, ValueError) as err:
        if Path(name).is_dir():
            raise ConfigError(f"modality.pretrained={name!r} is a folder but holds no transformers model ({err})") from None
        raise ConfigError(f"modality.pretrained={name!r} does not exist as a folder and the model hub is not reachable "
                          "(offline?); point modality.pretrained at a local folder written by save_pretrained") from None


# Speech models whose input is the raw waveform (a convolutional feature encoder, then a Transformer).
WAVEFORM_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
SPEECH_MODEL_TYPES = ("whisper", *WAVEFORM_MODEL_TYPES)


def encoder_layers(config: Any) -> int:
    return int(config.encoder_layers if config.model_type == "whisper" else config.num_hidden_layers)


def check_pretrained_speech_model(name: str, freeze: Any) -> None:
    config = speech_model_config(name)
    if config.model_type not in SPEECH_MODEL_TYPES:
        raise ConfigError(f"modality.pretrained={name!r} is a {config.model_type!r} model; the audio adapter reads "
                          f"Whisper encoders and waveform speech encoders (model_type one of {', '.join(SPEECH_MODEL_TYPES)})")
    layers = encoder_layers(config)
    blocks = 1 + layers
    if isinstance(freeze, int) and freeze > blocks:
        raise ConfigError(f"model.freeze={freeze} is deeper than {name}'s encoder: {blocks} blocks (the stem and "
                          f"{layers} layers); allowed: none, all, or 0..{blocks}")


def pretrained_speech_encoder(name: str, sample_rate: int) -> nn.Module:
    """The encoder class that reads `name`'s model type."""
    if speech_model_config(name).model_type == "whisper":
        return WhisperAudioEncoder(name, sample_rate)
    return WaveformSpeechEncoder(name, sample_rate)


def frames_holding_audio(waves: torch.Tensor, frames: int, span: int) -> torch.Tensor:
    """(B, frames, 1) mask: frame i (samples [i * span, (i + 1) * span)) holds audio where any sample is not 0.

    Clips are zero-padded (and views roll them circularly), so silence marks padding wherever it lies."""
    total = frames * span
    padded = F.pad(waves, (0, total - waves.shape[-1])) if waves.shape[-1] < total else waves[:, :total]
    return (padded.abs() > 0).view(waves.shape[0], frames, span).any(dim=2).unsqueeze(-1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class WhisperAudioEncoder(nn.Module):
    """(B, T) waveforms at `sample_rate` -> Whisper's log-mel (B, 80, frames) -> its encoder -> the mean of the
    hidden states over frames that hold audio -> (B, d_model).

    The log-mel is Whisper's own (16 kHz, 25 ms Hann window, 10 ms hop, its 80 mel filters, log10 clipped 8
    below the clip's maximum, scaled as (x + 4) / 4), computed in torch on the training device. The encoder runs
    its convolutional stem, the positional embeddings of as many frames as the clip has, its layers and final
    norm: the modules of `WhisperModel.encoder`, without its check that every input is 30 seconds long.
    """

    RATE = 16000
    HOP = 160
    N_FFT = 400

    def __init__(self, name: str, sample_rate: int) -> None:
        super().__init__()
        from transformers import WhisperFeatureExtractor, WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        offline = local_files_only(name)
        try:
            config = speech_model_config(name)
            if "WhisperEncoder" in (getattr(config, "architectures", None) or []):  # an exported encoder
                self.net = WhisperEncoder.from_pretrained(name, dtype=torch.float32, local_files_only=offline)
            else:
                self.net = WhisperModel.from_pretrained(name, dtype=torch.float32, local_files_only=offline).encoder
            extractor = WhisperFeatureExtractor.from_pretrained(name, local_files_only=offline)
            self.extractor = extractor
        except (OSError, ValueError) as err:
            raise DataError(f"modality.pretrained={name!r} cannot be loaded as a Whisper model ({err})") from None
        self.sample_rate = sample_rate
        self.weights_from = name  # frozen weights are rebuilt from here, not stored (dmssl/frozen_weights.py)
        self.feature_dim = int(self.net.config.d_model)
        self.register_buffer("mel_filters", torch.tensor(extractor.mel_filters, dtype=torch.float32).T.contiguous(),
                             persistent=False)  # (80, 201); from the model's own feature-extractor config
        self.register_buffer("window", torch.hann_window(self.N_FFT), persistent=False)

    def freeze_units(self) -> list[nn.Module]:
        """The convolutional stem (with the positional embeddings), then each Transformer layer; the final norm
        belongs to the last layer's block."""
        stem = nn.ModuleList([self.net.conv1, self.net.conv2, self.net.embed_positions])
        layers = list(self.net.layers)
        layers[-1] = nn.ModuleList([layers[-1], self.net.layer_norm])
        return [stem, *layers]

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waves.device.type, enabled=False):
            spectrum = torch.stft(waves.float(), self.N_FFT, self.HOP, window=self.window, return_complex=True)
            power = spectrum[..., :-1].abs() ** 2
            mel = (self.mel_filters @ power).clamp_min(1e-10).log10()
            mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
            return (mel + 4.0) / 4.0

    def can_start_from(self, n: int) -> bool:
        """The forward pass splits after the stem and any number of layers but the last (1 <= n <= layers)."""
        return 1 <= n <= len(self.net.layers)

    def encode_prefix(self, waves: torch.Tensor, n: int) -> torch.Tensor:
        """The output of the lower n freeze units (the stem, then n - 1 layers) with the mask of frames that
        hold audio as a last channel (dmssl.pretrained.with_mask_channel): (B, positions, d_model + 1)."""
        x, holds = self.embed(waves)
        return with_mask_channel(self.run_layers(x, self.net.layers[: n - 1]), holds)

    def encode_from(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of `forward` after `encode_prefix(waves, n)`: the other layers, the final norm, the pooling."""
        x, holds = split_mask_channel(hidden)
        return masked_mean(self.net.layer_norm(self.run_layers(x, self.net.layers[n - 1:])), holds)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        x, holds = self.embed(waves)
        return masked_mean(self.net.layer_norm(self.run_layers(x, self.net.layers)), holds)

    def embed(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem: (B, positions, d_model) inputs of the first layer, and the (B, positions, 1) mask of the
        positions that hold audio (a position covers 2 mel hops, 320 samples)."""
        if self.sample_rate != self.RATE:
            import torchaudio.functional as AF

            waves = AF.resample(waves.float(), self.sample_rate, self.RATE)
        net = self.net
        x = F.gelu(net.conv1(self.log_mel(waves).to(net.conv1.weight.dtype)))
        x = F.gelu(net.conv2(x)).permute(0, 2, 1)
        positions = x.shape[1]
        if positions > net.embed_positions.num_embeddings:
            raise DataError(f"clips of {waves.shape[-1] / self.RATE:.1f} s are longer than Whisper's 30-second window; "
                            "lower modality.clip_seconds")
        return x + net.embed_positions.weight[:positions], frames_holding_audio(waves, positions, self.HOP * 2)

    @staticmethod
    def run_layers(x: torch.Tensor, layers: Any) -> torch.Tensor:
        for layer in layers:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return x


class WaveformSpeechEncoder(nn.Module):
    """(B, T) waveforms at `sample_rate` -> resampled to the model's rate -> normalised per clip as its feature
    extractor does (zero mean, unit variance over the samples that hold audio; padding stays 0) -> the model
    (wav2vec2, HuBERT, WavLM or data2vec-audio through `AutoModel`) -> the mean of its last hidden states over
    the frames that hold audio -> (B, hidden_size).

    No attention mask is passed: views roll clips circularly, so padding is not always at the end, and the
    base-sized models of these families were trained on zero-padded batches without one; the pooling skips
    padded frames instead. The model's own SpecAugment is turned off: the adapter's strong view does that work,
    and the weak view must stay weak.
    """

    def __init__(self, name: str, sample_rate: int) -> None:
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel

        offline = local_files_only(name)
        try:
            self.net = AutoModel.from_pretrained(name, dtype=torch.float32, local_files_only=offline)
            self.extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=offline)
        except (OSError, ValueError) as err:
            raise DataError(f"modality.pretrained={name!r} cannot be loaded as a speech encoder with its feature "
                            f"extractor ({err})") from None
        self.net.config.apply_spec_augment = False
        self.sample_rate = sample_rate
        self.weights_from = name  # frozen weights are rebuilt from here, not stored (dmssl/frozen_weights.py)
        self.model_rate = int(self.extractor.sampling_rate)
        self.normalize = bool(getattr(self.extractor, "do_normalize", True))
        self.feature_dim = int(self.net.config.hidden_size)
        self.span = 1
        for stride in self.net.config.conv_stride:
            self.span *= int(stride)

    def freeze_units(self) -> list[nn.Module]:
        """The stem (the convolutional feature encoder, its projection, the convolutional positional embedding and,
        in post-norm models, the encoder's input norm), then each Transformer layer; in pre-norm ("stable layer
        norm") models the final norm belongs to the last layer's block."""
        net, encoder = self.net, self.net.encoder
        stem = [net.feature_extractor, net.feature_projection, encoder.pos_conv_embed]
        layers = list(encoder.layers)
        if getattr(net.config, "do_stable_layer_norm", False):
            layers[-1] = nn.ModuleList([layers[-1], encoder.layer_norm])
        else:
            stem.append(encoder.layer_norm)
        return [nn.ModuleList(stem), *layers]

    def can_start_from(self, n: int) -> bool:
        """The forward pass splits after the stem and any number of layers but the last (1 <= n <= layers),
        except in WavLM, whose layers pass a relative position bias from the first to the others."""
        return self.net.config.model_type != "wavlm" and 1 <= n <= len(self.net.encoder.layers)

    def encode_prefix(self, waves: torch.Tensor, n: int) -> torch.Tensor:
        """The output of the lower n freeze units (the stem, then n - 1 layers) with the mask of frames that
        hold audio as a last channel (dmssl.pretrained.with_mask_channel): (B, frames, hidden_size + 1)."""
        x, holds = self.embed(waves)
        return with_mask_channel(self.run_layers(x, self.net.encoder.layers[: n - 1]), holds)

    def encode_from(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of `forward` after `encode_prefix(waves, n)`: the other layers, a pre-norm model's final norm,
        the pooling."""
        x, holds = split_mask_channel(hidden)
        return masked_mean(self.finish(self.run_layers(x, self.net.encoder.layers[n - 1:])), holds)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        waves, holds = self.normalized(waves)
        hidden = self.net(input_values=waves).last_hidden_state
        return masked_mean(hidden, frames_holding_audio(holds.float(), hidden.shape[1], self.span))

    def normalized(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms at the model's rate, normalised as its feature extractor does, and the samples holding audio."""
        waves = waves.float()
        if self.sample_rate != self.model_rate:
            import torchaudio.functional as AF

            waves = AF.resample(waves, self.sample_rate, self.model_rate)
        holds = waves.abs() > 0
        if self.normalize:
            with torch.autocast(device_type=waves.device.type, enabled=False):
                count = holds.sum(1, keepdim=True).clamp_min(1)
                mean = (waves * holds).sum(1, keepdim=True) / count
                var = (((waves - mean) * holds) ** 2).sum(1, keepdim=True) / count
                waves = torch.where(holds, (waves - mean) / (var + 1e-7).sqrt(), torch.zeros_like(waves))
        return waves, holds

    def embed(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem, as the model's forward pass runs it without an attention mask: the convolutional features,
        their projection, plus the convolutional positional embedding, then (post-norm models) the input norm.
        The layers above a cached prefix train without the model's LayerDrop (its forward pass, which full
        fine-tuning runs, keeps it).
        Returns the first layer's (B, frames, hidden_size) inputs and the (B, frames, 1) mask of frames holding
        audio."""
        waves, holds = self.normalized(waves)
        net, encoder = self.net, self.net.encoder
        projected = net.feature_projection(net.feature_extractor(waves).transpose(1, 2))
        x = projected[0] if isinstance(projected, tuple) else projected
        x = x + encoder.pos_conv_embed(x)
        if not getattr(net.config, "do_stable_layer_norm", False):
            x = encoder.layer_norm(x)
        return encoder.dropout(x), frames_holding_audio(holds.float(), x.shape[1], self.span)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encoder.layer_norm(x) if getattr(self.net.config, "do_stable_layer_norm", False) else x

    @staticmethod
    def run_layers(x: torch.Tensor, layers: Any) -> torch.Tensor:
        for layer in layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return x
