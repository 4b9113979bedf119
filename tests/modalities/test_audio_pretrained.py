"""The pretrained speech encoder of the audio adapter (`model.encoder=pretrained`), on a tiny random Whisper built
in the test, and once on the real Whisper tiny.en kept beside the project."""

import numpy as np
import pytest
import torch

from dmssl.errors import ConfigError
from dmssl.pretrained import apply_freeze
from dmssl.recipe import resolve
from modalities.audio import WhisperAudioEncoder
from tests.conftest import ROOT, SHARED_DATA

WHISPER = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
FSDD = SHARED_DATA / "fsdd" / "fsdd-recordings.tar.gz"


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A 2-layer, 16-wide Whisper with random weights and the standard 80-mel feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    folder = tmp_path_factory.mktemp("tiny-whisper")
    config = WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                           max_source_positions=100, max_target_positions=16, vocab_size=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def test_log_mel_is_whispers_own(tiny_whisper):
    from transformers import WhisperFeatureExtractor

    encoder = WhisperAudioEncoder(str(tiny_whisper), 16000)
    wave = (0.1 * torch.sin(torch.linspace(0, 800 * np.pi, 16000)) + 0.01 * torch.randn(16000)).float()
    ours = encoder.log_mel(wave[None])[0].numpy()
    theirs = WhisperFeatureExtractor.from_pretrained(tiny_whisper)(
        wave.numpy(), sampling_rate=16000, padding="do_not_pad", return_tensors="np")["input_features"][0]
    assert ours.shape == theirs.shape == (80, 100)
    assert np.abs(ours - theirs).max() < 1e-3


def test_encoder_pools_over_the_frames_that_hold_audio(tiny_whisper):
    encoder = WhisperAudioEncoder(str(tiny_whisper), 8000).eval()  # 8 kHz clips: resampled inside
    waves = torch.zeros(3, 8000)
    waves[0, :4000] = 0.1 * torch.randn(4000)
    waves[1] = 0.1 * torch.randn(8000)
    with torch.no_grad():
        features = encoder(waves)
    assert features.shape == (3, 16) and torch.isfinite(features).all()
    assert torch.equal(features[2], torch.zeros(16))  # silence: no frame holds audio
    assert [len(u) if hasattr(u, "__len__") else 1 for u in encoder.freeze_units()][:1] == [3]
    assert len(encoder.freeze_units()) == 3  # the stem and two layers
    assert "lower 2 of 3 blocks" in apply_freeze(encoder, 2)


def test_whisper_runs_in_two_parts_after_every_layer_but_the_last(tiny_whisper):
    encoder = WhisperAudioEncoder(str(tiny_whisper), 8000).eval()
    torch.manual_seed(2)
    waves = torch.zeros(3, 8000)
    waves[0, :3000] = 0.1 * torch.randn(3000)  # padding after it: the mask must travel with the prefix
    waves[1] = 0.1 * torch.randn(8000)
    with torch.no_grad():
        whole = encoder(waves)
        for n in (1, 2):
            hidden = encoder.encode_prefix(waves, n)
            assert hidden.shape == (3, 50, 17)  # 1 s -> 50 positions; 16 channels and the mask
            assert hidden[0, :, -1].sum() < hidden[1, :, -1].sum() == 50 and hidden[2, :, -1].sum() == 0
            assert torch.allclose(encoder.encode_from(hidden, n), whole, atol=1e-5), n
            # in the cache's fp16 the mask is exact and the features close
            assert torch.allclose(encoder.encode_from(hidden.half().float(), n), whole, atol=1e-2), n
    assert encoder.can_start_from(1) and encoder.can_start_from(2)
    assert not encoder.can_start_from(0) and not encoder.can_start_from(3)  # 3: every block, the whole encoder


def test_a_frozen_whisper_prefix_is_cached_and_only_the_top_layer_trains(tiny_whisper, tmp_path, monkeypatch, capsys):
    from dmssl.trainer import fit
    from tests.modalities.test_audio import make_folder
    from tests.tiny_models import stored_and_rebuilt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = make_folder(tmp_path / "clips")
    summary = fit(resolve(["recipe=audio_fsdd_pretrained", f"data.root={root}", f"modality.pretrained={tiny_whisper}",
                           "modality.test_pattern=_[0-1]\\.wav$", "data.labels_per_class=2", "data.batch_size=4",
                           "data.mu=2", "model.freeze=2", "model.cached_views=1", f"data.cache_dir={tmp_path / 'cache'}",
                           "trainer.max_steps=4", "trainer.eval_every=2", "trainer.progress_bar=false",
                           "trainer.mixed_precision=no", f"output_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    assert summary["steps"] == 4 and "lower 2 of 3 blocks" in out and "feature cache: encoded" in out
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    train = np.load(folder / "train.npy", mmap_mode="r")
    assert train.ndim == 4 and train.shape[1:] == (3, 50, 17)  # (N, clean + weak + strong, positions, 16 + mask)
    pretrained = WhisperAudioEncoder(str(tiny_whisper), 16000).state_dict()
    trained, rebuilt = stored_and_rebuilt(tmp_path / "run", pretrained)
    frozen = [k for k in pretrained if k.startswith(("net.conv1", "net.layers.0."))]
    top = [k for k in pretrained if k.startswith("net.layers.1.")]
    assert frozen and all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in frozen)
    assert rebuilt and all(k.startswith("encoder.") for k in rebuilt)  # left out of the checkpoint
    assert top and not all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in top)


def test_recipe_checks_the_pretrained_model_before_data_loads(tiny_whisper, tmp_path, monkeypatch):
    from dmssl.modality import build_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["recipe=audio_fsdd_pretrained", "data.root=/no/such/archive.tar.gz"]
    adapter = build_adapter(resolve([*base, f"modality.pretrained={tiny_whisper}"]))
    assert adapter.build_encoder().feature_dim == 16
    with pytest.raises(ConfigError, match="model.freeze=4 is deeper than .* 3 blocks"):
        build_adapter(resolve([*base, f"modality.pretrained={tiny_whisper}", "model.freeze=4"]))
    with pytest.raises(ConfigError, match="needs modality.pretrained"):
        build_adapter(resolve(base))
    with pytest.raises(ConfigError, match="does not exist as a folder and the model hub is not reachable"):
        build_adapter(resolve([*base, "modality.pretrained=no-such-org/no-such-speech-model"]))
    (tmp_path / "bert").mkdir()
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="is a .bert. model; the audio adapter reads Whisper encoders and waveform speech encoders"):
        build_adapter(resolve([*base, f"modality.pretrained={tmp_path / 'bert'}"]))


@pytest.mark.slow
@pytest.mark.skipif(not (WHISPER.is_dir() and FSDD.is_file()), reason="the shared Whisper tiny.en or FSDD is not beside the project")
def test_real_whisper_tiny_en_on_real_fsdd_clips():
    from dmssl.modality import build_adapter

    cfg = resolve(["recipe=audio_fsdd_pretrained", f"data.root={FSDD}", f"modality.pretrained={WHISPER}"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    encoder = adapter.build_encoder().eval()
    assert encoder.feature_dim == 384 and len(encoder.freeze_units()) == 5
    picked = [next(i for i, y in enumerate(raw.test_labels) if y == k) for k in range(10)]
    with torch.no_grad():
        features = encoder(adapter.collate([raw.test[i] for i in picked] * 2))
    assert torch.isfinite(features).all() and torch.allclose(features[:10], features[10:])
    with torch.no_grad():  # a frozen prefix of the stem and 3 layers, then the last: the same features
        clips = adapter.collate([raw.test[i] for i in picked])
        assert torch.allclose(encoder.encode_from(encoder.encode_prefix(clips, 4), 4), features[:10], atol=1e-4)
    # ten different digits give ten clearly different features
    cosine = torch.nn.functional.normalize(features[:10], dim=1) @ torch.nn.functional.normalize(features[:10], dim=1).T
    assert cosine[~torch.eye(10, dtype=torch.bool)].max() < 0.999


# ---------------------------------------------------------------- waveform speech encoders (wav2vec2 family)

def tiny_waveform_model(folder, family: str, **extra):
    """A 2-layer, 16-wide model of `family` with random weights, 320-sample frames, and its feature extractor."""
    import transformers
    from transformers import Wav2Vec2FeatureExtractor

    config_class, model_class = {"wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
                                 "hubert": (transformers.HubertConfig, transformers.HubertModel),
                                 "wavlm": (transformers.WavLMConfig, transformers.WavLMModel)}[family]
    config = config_class(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          conv_dim=(8, 8, 8), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8),
                          num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, **extra)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory):
    return tiny_waveform_model(tmp_path_factory.mktemp("tiny-wav2vec2"), "wav2vec2")


@pytest.mark.parametrize("family,extra", [("wav2vec2", {}), ("hubert", {}), ("wavlm", {}),
                                          ("wav2vec2", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"})])
def test_waveform_encoder__the_models_own_features_pooled_over_frames_holding_audio(family, extra, tmp_path):
    from transformers import AutoModel

    from modalities.audio import WaveformSpeechEncoder, pretrained_speech_encoder

    folder = tiny_waveform_model(tmp_path / family, family, **extra)
    encoder = pretrained_speech_encoder(str(folder), 16000).eval()
    assert isinstance(encoder, WaveformSpeechEncoder) and encoder.feature_dim == 16 and encoder.span == 320
    torch.manual_seed(1)
    speech = 0.1 * torch.randn(16000)
    waves = torch.stack([speech, torch.zeros(16000)])
    waves[1, :8000] = speech[:8000]  # the first half, then padding
    with torch.no_grad():
        ours = encoder(waves)
        # by hand: the extractor's normalisation of the audio alone, the model, the mean over its frames
        net = AutoModel.from_pretrained(folder).eval()
        alone = [(w - w.mean()) / (w.var(unbiased=False) + 1e-7).sqrt() for w in (speech, speech[:8000])]
        full = net(input_values=alone[0][None]).last_hidden_state[0].mean(0)
    assert ours.shape == (2, 16) and torch.isfinite(ours).all()
    assert torch.allclose(ours[0], full, atol=1e-5)
    # the half clip: its padding is skipped (frames of audio only), so it is not the mean over all frames
    padded = torch.cat([alone[1], torch.zeros(8000)])
    with torch.no_grad():
        every_frame = net(input_values=padded[None]).last_hidden_state[0]
    assert torch.allclose(ours[1], every_frame[:25].mean(0), atol=1e-5)
    assert not torch.allclose(ours[1], every_frame.mean(0), atol=1e-3)
    units = encoder.freeze_units()
    assert len(units) == 3  # the stem and two layers
    norm_in_stem = not extra.get("do_stable_layer_norm")
    assert any(m is net_m for m in units[0].modules() for net_m in [encoder.net.encoder.layer_norm]) == norm_in_stem
    assert "lower 1 of 3 blocks" in apply_freeze(encoder, 1)
    assert not any(p.requires_grad for p in encoder.net.feature_extractor.parameters())
    assert all(p.requires_grad for p in encoder.net.encoder.layers[0].parameters())


@pytest.mark.parametrize("family,extra", [("wav2vec2", {}), ("hubert", {}),
                                          ("wav2vec2", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"})])
def test_waveform_encoder_runs_in_two_parts_as_the_models_own_forward_pass(family, extra, tmp_path):
    from modalities.audio import pretrained_speech_encoder

    encoder = pretrained_speech_encoder(str(tiny_waveform_model(tmp_path / family, family, **extra)), 16000).eval()
    torch.manual_seed(3)
    waves = torch.zeros(2, 16000)
    waves[0] = 0.1 * torch.randn(16000)
    waves[1, :6000] = 0.1 * torch.randn(6000)
    with torch.no_grad():
        whole = encoder(waves)
        for n in (1, 2):
            hidden = encoder.encode_prefix(waves, n)
            assert hidden.shape == (2, 49, 17) and hidden[1, :, -1].sum() < 49  # 320-sample frames
            assert torch.allclose(encoder.encode_from(hidden, n), whole, atol=1e-5), (family, n)
    assert not encoder.can_start_from(0) and not encoder.can_start_from(3)


def test_wavlm_does_not_split_its_layers(tmp_path):
    from modalities.audio import pretrained_speech_encoder

    encoder = pretrained_speech_encoder(str(tiny_waveform_model(tmp_path / "wavlm", "wavlm")), 16000)
    assert not encoder.can_start_from(1)  # its layers pass a position bias on: the whole forward pass trains


def test_waveform_encoder__8_khz_clips_are_resampled_and_silence_pools_to_zero(tiny_wav2vec2):
    from modalities.audio import WaveformSpeechEncoder

    encoder = WaveformSpeechEncoder(str(tiny_wav2vec2), 8000).eval()
    waves = torch.zeros(2, 8000)
    waves[0] = 0.1 * torch.randn(8000)
    with torch.no_grad():
        features = encoder(waves)
    assert features.shape == (2, 16) and torch.isfinite(features).all()
    assert torch.equal(features[1], torch.zeros(16))


def test_waveform_encoder__recipe_checks_depth_before_data_loads(tiny_wav2vec2, monkeypatch):
    from dmssl.modality import build_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["recipe=audio_fsdd_pretrained", "data.root=/no/such/archive.tar.gz", f"modality.pretrained={tiny_wav2vec2}"]
    assert build_adapter(resolve(base)).build_encoder().feature_dim == 16
    with pytest.raises(ConfigError, match="model.freeze=4 is deeper than .* 3 blocks"):
        build_adapter(resolve([*base, "model.freeze=4"]))


@pytest.mark.parametrize("model,reader", [("tiny_whisper", "whisper"), ("tiny_wav2vec2", "auto")])
def test_a_cached_pretrained_run_exports_an_encoder_transformers_reads(model, reader, request, tmp_path, monkeypatch):
    from transformers import AutoModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    import dmssl
    from dmssl.trainer import fit
    from tests.modalities.test_audio import make_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = make_folder(tmp_path / "clips")
    summary = fit(resolve(["recipe=audio_fsdd_pretrained", f"data.root={root}",
                           f"modality.pretrained={request.getfixturevalue(model)}",
                           "modality.test_pattern=_[0-1]\\.wav$", "data.labels_per_class=2", "data.batch_size=4",
                           "data.mu=2", "model.cached_views=1", f"data.cache_dir={tmp_path / 'cache'}",
                           "trainer.max_steps=4", "trainer.eval_every=2", "trainer.progress_bar=false",
                           "trainer.mixed_precision=no", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 4 and summary["num_test"] == 6
    clips = [torch.randn(16000) * 0.1 for _ in range(3)]
    clf = dmssl.load(tmp_path / "run")
    exported = dmssl.export(tmp_path / "run", tmp_path / "export")
    again = dmssl.load(exported)
    assert np.allclose(again.predict_proba(clips), clf.predict_proba(clips), atol=1e-5)
    net = (WhisperEncoder if reader == "whisper" else AutoModel).from_pretrained(exported / "encoder")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.model.encoder.net.state_dict().values()))
