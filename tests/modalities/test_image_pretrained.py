"""The pretrained image encoder (`model.encoder=pretrained`: any timm model), on a tiny random timm model written
in the test in timm's hub layout, and once on the real EfficientNet-Lite0 kept beside the project."""

import numpy as np
import pytest
import torch

import dmssl
from dmssl.errors import ConfigError
from dmssl.pretrained import apply_freeze
from dmssl.recipe import resolve
from dmssl.trainer import fit
from modalities.image import TimmEncoder
from tests.conftest import ROOT

LITE0 = ROOT.parent / "shared" / "models" / "tf_efficientnet_lite0"
Q = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "trainer.save_embeddings=false",
     "data.batch_size=8", "data.mu=2", "trainer.mixed_precision=no", "trainer.max_steps=4", "model.encoder=pretrained"]


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    import timm
    from timm.models._hub import save_for_hf

    folder = tmp_path_factory.mktemp("tiny-timm")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_efficientnet", pretrained=False), str(folder), safe_serialization=True)
    return folder


def test_timm_encoder_resizes_normalises_and_freezes_by_timms_groups(tiny_timm):
    encoder = TimmEncoder(str(tiny_timm), in_channels=1, size=32).eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (3, encoder.feature_dim) and torch.isfinite(features).all()
    x = encoder.prepare(images)
    assert x.shape == (3, 3, 32, 32)  # grey repeated to RGB, resized to the encoder's size
    units = encoder.freeze_units()
    assert len(units) >= 3  # stem, stages, head
    assert f"lower 1 of {len(units)} blocks" in apply_freeze(encoder, 1)
    assert all(not p.requires_grad for p in units[0].parameters())
    assert all(p.requires_grad for p in units[-1].parameters())


def test_a_cached_timm_run_predicts_exports_and_the_export_loads_with_timm(tiny_timm, tmp_path):
    import timm

    summary = fit(resolve([*Q, f"modality.pretrained={tiny_timm}", "modality.pretrained_size=32", "model.freeze=all",
                           "model.cached_views=1", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 4 and any((tmp_path / "cache").iterdir())
    from modalities.image import load_digits

    images = load_digits(seed=0).test[:6]
    clf = dmssl.load(tmp_path / "run")
    exported = dmssl.export(tmp_path / "run", tmp_path / "export")
    again = dmssl.load(exported)
    assert (again.predict(images) == clf.predict(images)).all()
    net = timm.create_model(f"local-dir:{exported / 'encoder'}", pretrained=True, num_classes=0).eval()
    x = clf.model.encoder.prepare(clf.adapter.collate([clf.adapter.test_view(s) for s in images]))
    with torch.no_grad():
        assert torch.allclose(net(x), clf.model.encoder.net(x), atol=1e-5)


def test_pretrained_image_errors(tiny_timm, tmp_path, monkeypatch):
    from dmssl.modality import build_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="needs modality.pretrained"):
        build_adapter(resolve(Q))
    adapter = build_adapter(resolve([*Q, "modality.pretrained=no_such_architecture_name"]))
    with pytest.raises(ConfigError, match="no_such_architecture_name"):
        adapter.build_encoder()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder but holds no timm model"):
        build_adapter(resolve([*Q, f"modality.pretrained={tmp_path / 'empty'}"])).build_encoder()
    encoder = TimmEncoder(str(tiny_timm))
    with pytest.raises(ConfigError, match="deeper than the encoder's"):
        apply_freeze(encoder, 99)


@pytest.mark.slow
@pytest.mark.skipif(not LITE0.is_dir(), reason="the shared EfficientNet-Lite0 is not beside the project")
def test_real_efficientnet_lite0_uses_its_own_preprocessing():
    encoder = TimmEncoder(str(LITE0)).eval()
    assert encoder.size == 224 and encoder.interpolation == "bicubic" and encoder.feature_dim == 1280
    assert np.allclose(encoder.mean.flatten().tolist(), [0.5, 0.5, 0.5])
    with torch.no_grad():
        features = encoder(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
