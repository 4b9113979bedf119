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


def test_timm_encoder_runs_in_two_parts_at_every_stage(tiny_timm):
    encoder = TimmEncoder(str(tiny_timm), in_channels=1, size=32).eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    stages = len(encoder.net.blocks)
    with torch.no_grad():
        whole = encoder(images)
        for n in range(1, stages + 1):
            hidden = encoder.encode_prefix(images, n)
            assert hidden.ndim == 4 and hidden.shape[0] == 3
            assert torch.allclose(encoder.encode_from(hidden, n), whole, atol=1e-5), n
    assert encoder.can_start_from(1) and encoder.can_start_from(stages)
    assert not encoder.can_start_from(0) and not encoder.can_start_from(stages + 1)


def test_a_frozen_prefix_is_cached_and_only_the_top_trains(tiny_timm, tmp_path, capsys):
    from tests.tiny_models import stored_and_rebuilt

    cache = tmp_path / "cache"
    base = [*Q, f"modality.pretrained={tiny_timm}", "modality.pretrained_size=32", "model.cached_views=1",
            f"data.cache_dir={cache}"]
    summary = fit(resolve([*base, "model.freeze=2", f"output_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    assert summary["steps"] == 4 and "lower 2 of" in out and "feature cache: encoded" in out
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    train = np.load(folder / "train.npy", mmap_mode="r")
    assert train.ndim == 5 and train.shape[1] == 3  # (N, clean + 1 weak + 1 strong, C, H, W) feature maps
    # the prefix (stem and first stage) is as pretrained; the stages above it trained on the cached maps
    pretrained = TimmEncoder(str(tiny_timm), in_channels=1, size=32).state_dict()
    trained, rebuilt = stored_and_rebuilt(tmp_path / "run", pretrained)
    stem = [k for k in pretrained if k.startswith("net.conv_stem") or k.startswith("net.blocks.0.")]
    top = [k for k in pretrained if k.startswith("net.conv_head")]
    assert stem and all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in stem)
    assert rebuilt and all(k.startswith("encoder.") for k in rebuilt)  # left out of the checkpoint
    assert top and not all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in top)
    # the trained model reads raw images, and agrees with what the run measured on its cached test maps
    from modalities.image import load_digits

    raw = load_digits(seed=0)
    predicted = dmssl.load(tmp_path / "run").predict(raw.test)
    import json

    confusion = np.array(json.loads((tmp_path / "run" / "confusion_matrix.json").read_text())["matrix"])
    assert abs((predicted == np.array(raw.test_labels)).mean() - confusion.trace() / confusion.sum()) < 0.02
    # another depth is another cache; the whole frozen encoder yet another
    fit(resolve([*base, "model.freeze=3", f"output_dir={tmp_path / 'run3'}"]))
    fit(resolve([*base, "model.freeze=all", f"output_dir={tmp_path / 'all'}"]))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3


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
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        features = encoder(images)
        for n in (3, 7):  # a frozen prefix of the stem and 2 (or 6) stages, then the rest: the same features
            assert torch.allclose(encoder.encode_from(encoder.encode_prefix(images, n), n), features, atol=1e-4)
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert encoder.can_start_from(7) and not encoder.can_start_from(8)  # 8 units: stem, 7 stages (head with the last)


def test_speed_benchmark_times_a_cached_prefix_step_where_the_encoder_has_one(tiny_timm):
    from benchmarks.speed import cache_costs, cache_markdown

    torch.set_num_threads(1)
    report = cache_costs(["recipe=quickstart", "model.encoder=pretrained", f"modality.pretrained={tiny_timm}",
                          "modality.pretrained_size=32", "data.eval_batch_size=16", "data.batch_size=4", "data.mu=1"],
                         repeats=1)
    assert report["prefix_blocks"] == report["of_blocks"] - 2 > 0
    assert report["full_step_s"] > 0 and report["cached_step_s"] > 0 and report["prefix_step_s"] > 0
    table = cache_markdown({"date": "d", "machine": "m", "command": "c", "cache": [report]})
    assert f"(freeze={report['prefix_blocks']} of {report['of_blocks']})" in table
