"""Freezing (`model.freeze`) and the frozen-feature cache (`model.cached_views`), on the quickstart's CNN and a
tiny random model of each freezable family."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dmssl.errors import ConfigError
from dmssl.feature_cache import FeatureCache, cache_key, open_or_build
from dmssl.modality import build_adapter
from dmssl.model import CachedInputs, SSLModel
from dmssl.pretrained import apply_freeze, is_fully_frozen, keep_in_eval
from dmssl.recipe import resolve
from dmssl.trainer import fit

# fp32 pinned: runs are compared to each other and to the encoder's own outputs at fp16's tolerance.
Q = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "trainer.save_embeddings=false",
     "data.batch_size=8", "data.mu=2", "trainer.mixed_precision=no", "trainer.max_steps=6"]


class Blocks(nn.Module):
    """Three linear blocks with batch norm, declaring them for partial freezing."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(3)])
        self.feature_dim = 4

    def freeze_units(self):
        return list(self.units)

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x


def test_freeze_lower_blocks_all_and_none():
    encoder = Blocks()
    assert "lower 2 of 3 blocks frozen" in apply_freeze(encoder, 2)
    assert [all(not p.requires_grad for p in u.parameters()) for u in encoder.units] == [True, True, False]
    encoder.train()
    assert [u.training for u in encoder.units] == [False, False, True]  # frozen blocks stay in eval mode
    with pytest.raises(ConfigError, match="model.freeze=4 is deeper than the encoder's 3 blocks"):
        apply_freeze(Blocks(), 4)
    whole = Blocks()
    apply_freeze(whole, "all")
    assert is_fully_frozen(whole)
    whole.train()
    assert not whole.training and not any(u.training for u in whole.units)
    assert "every parameter trains" in apply_freeze(Blocks(), "none")
    with pytest.raises(ConfigError, match="declares no blocks"):
        apply_freeze(nn.Linear(2, 2), 1)


def test_what_a_cache_can_hold_a_whole_frozen_encoder_a_splittable_prefix_or_nothing():
    from dmssl.pretrained import cached_prefix_blocks

    class Splittable(Blocks):
        def can_start_from(self, n):
            return 1 <= n < 3

        def encode_prefix(self, x, n):
            for unit in self.units[:n]:
                x = unit(x)
            return x

        def encode_from(self, hidden, n):
            for unit in self.units[n:]:
                hidden = unit(hidden)
            return hidden

    plain, splittable, whole = Blocks(), Splittable(), Blocks()
    apply_freeze(plain, 2)
    apply_freeze(splittable, 2)
    apply_freeze(whole, "all")
    assert cached_prefix_blocks(whole, "all") == 0
    assert cached_prefix_blocks(splittable, 2) == 2
    assert cached_prefix_blocks(plain, 2) is None  # no encode_prefix: the whole forward runs at every step
    assert cached_prefix_blocks(Splittable(), "none") is None and cached_prefix_blocks(Splittable(), 3) is None
    x = torch.randn(5, 4)
    splittable.eval()
    assert torch.allclose(splittable.encode_from(splittable.encode_prefix(x, 2), 2), splittable(x))


def test_a_frozen_module_stays_in_eval_after_a_deep_copy():
    import copy

    block = nn.BatchNorm1d(3)
    keep_in_eval(block)
    clone = copy.deepcopy(block)
    clone.train()
    assert not clone.training and not block.training


def test_the_model_skips_its_encoder_for_cached_inputs():
    class Refuses(nn.Module):
        feature_dim = 4

        def forward(self, x):
            raise AssertionError("the encoder ran on cached inputs")

    model = SSLModel(Refuses(), num_classes=3, proj_hidden_dim=8, proj_dim=8)
    z = model(CachedInputs(features=torch.randn(5, 4)))
    assert z.shape == (5, 8) and torch.allclose(z.norm(dim=1), torch.ones(5))


def built_cache(tmp_path, views=2):
    cfg = resolve([*Q, f"data.cache_dir={tmp_path / 'cache'}", "model.freeze=all"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    torch.manual_seed(0)  # the quickstart's CNN is random: the same weights each time, as a pretrained one has
    encoder = adapter.build_encoder()
    apply_freeze(encoder, "all")
    lines = []
    cache = open_or_build(adapter, raw, encoder, views, cfg.data.cache_dir, torch.device("cpu"), 256, log=lines.append)
    return adapter, raw, encoder, cache, lines


def test_cache_holds_the_encoders_outputs_and_is_reused_and_rebuilt_when_broken(tmp_path):
    adapter, raw, encoder, cache, lines = built_cache(tmp_path)
    assert cache.train.shape == (len(raw.train), 5, encoder.feature_dim) and cache.train.dtype == np.float16
    assert "encoded" in lines[0] and "views/s" in lines[0]
    with torch.no_grad():
        clean = encoder(adapter.collate([adapter.test_view(s) for s in raw.train[:16]]))
        test = encoder(adapter.collate([adapter.test_view(s) for s in raw.test[:16]]))
    assert np.allclose(np.asarray(cache.train[:16, 0], dtype=np.float32), clean.numpy(), rtol=2e-3, atol=2e-3)
    assert np.allclose(np.asarray(cache.test[:16], dtype=np.float32), test.numpy(), rtol=2e-3, atol=2e-3)
    weak = np.asarray(cache.train[:16, 1:3], dtype=np.float32)
    assert not np.allclose(weak[:, 0], weak[:, 1])  # two different weak views
    # opened again: the same folder, not rebuilt
    *_, again, lines = built_cache(tmp_path)
    assert again.folder == cache.folder and "built before" in lines[0]
    # another K: another cache
    *_, other, _ = built_cache(tmp_path, views=1)
    assert other.folder != cache.folder and other.train.shape[1] == 3
    # torn file: detected, rebuilt with a warning naming it, the same bytes as before
    before = np.asarray(cache.train[:, :]).copy()
    (cache.folder / "train.npy").write_bytes((cache.folder / "train.npy").read_bytes()[:1000])
    with pytest.warns(UserWarning, match="feature cache .* is incomplete or corrupt.*rebuilding it"):
        *_, rebuilt, _ = built_cache(tmp_path)
    assert np.array_equal(np.asarray(rebuilt.train), before)  # the seeded view stream: the same bytes


def test_views_equal_to_the_clean_view_are_copied_not_encoded(tmp_path):
    cfg = resolve([*Q, f"data.cache_dir={tmp_path / 'cache'}", "model.freeze=all"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    raw = type(raw)(train=raw.train[:40], train_labels=raw.train_labels[:40], test=raw.test[:8],
                    test_labels=raw.test_labels[:8], class_names=raw.class_names)
    adapter.weak_views = lambda samples: [adapter.test_view(s) for s in samples]  # as text's with no token dropout
    torch.manual_seed(0)
    encoder = adapter.build_encoder()
    apply_freeze(encoder, "all")
    encoded = []
    encoder.register_forward_hook(lambda module, args, out: encoded.append(out.shape[0]))
    lines = []
    cache = open_or_build(adapter, raw, encoder, 2, cfg.data.cache_dir, torch.device("cpu"), 16, log=lines.append)
    rows = np.asarray(cache.train, dtype=np.float32)
    assert np.array_equal(rows[:, 1], rows[:, 0]) and np.array_equal(rows[:, 2], rows[:, 0])  # the weak views
    assert not np.allclose(rows[:, 3], rows[:, 0])  # a strong view is encoded
    assert sum(encoded) == 1 + 40 * (1 + 2) + 8  # the shape probe; clean and two strong views of each; the tests
    assert "80 equal to their clean view, copied" in lines[0]


@pytest.mark.parametrize(("a", "b", "same"), [
    ([1, 2, 3], [1, 2, 3], True), ([1, 2, 3], [1, 2], False), (torch.ones(3), torch.ones(3), True),
    (torch.ones(3), torch.ones(4), False), (torch.ones(3), torch.ones(3, dtype=torch.float64), False),
    (torch.ones(3), [1.0, 1.0, 1.0], False), (np.zeros(2), np.zeros(2), True),
    ({"x": torch.ones(2)}, {"x": torch.ones(2)}, False),  # no single truth value: counted as different
])
def test_same_view(a, b, same):
    from dmssl.feature_cache import same_view

    assert same_view(a, b) is same


def test_cache_key_changes_with_the_data_the_weights_and_the_views(tmp_path):
    adapter, raw, encoder, cache, _ = built_cache(tmp_path)
    key = cache_key(adapter, raw, encoder, 2)
    assert key != cache_key(adapter, raw, encoder, 3)
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    assert cache_key(adapter, raw, encoder, 2)["weights"] != key["weights"]
    raw.train[0] = raw.train[0].clone() + 1
    assert cache_key(adapter, raw, encoder, 2)["train"] != key["train"]
    with pytest.raises(Exception, match="other data, encoder or views"):
        FeatureCache(cache.folder, cache_key(adapter, raw, encoder, 2))


def test_one_file_spelled_two_ways_is_one_cache_key(tmp_path, monkeypatch):
    from dmssl.feature_cache import options_identity
    from modalities.text import TextOptions

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "data" / "b.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    absolute = options_identity(TextOptions(train_files=[str(tmp_path / "data" / "a.jsonl")], pretrained="org/model"))
    assert options_identity(TextOptions(train_files=["../data/a.jsonl"], pretrained="org/model")) == absolute
    assert options_identity(TextOptions(train_files=["../link/a.jsonl"], pretrained="org/model")) == absolute
    assert options_identity(TextOptions(train_files=["../data/b.jsonl"], pretrained="org/model")) != absolute
    assert "'org/model'" in absolute  # a hub name is no path here: kept as written
    assert options_identity(TextOptions(train_files=["../data/a.jsonl"], pretrained="org/model", max_length=64)) != absolute


def test_a_cached_run_trains_shares_its_cache_across_objectives_and_resumes_bit_identically(tmp_path, capsys):
    # (Across seeds too, for a pretrained encoder; the quickstart's CNN is initialised from the seed.)
    cache_dir = tmp_path / "cache"
    steps = [*Q, "model.freeze=all", "model.cached_views=2", f"data.cache_dir={cache_dir}", "trainer.checkpoint_every=3",
             "trainer.keep_checkpoints=5"]
    first = fit(resolve([*steps, f"output_dir={tmp_path / 'a'}"]))
    out = capsys.readouterr().out
    assert "encoder: frozen" in out and "feature cache: encoded" in out and first["steps"] == 6
    fit(resolve([*steps, "objective.name=sscl", f"output_dir={tmp_path / 'b'}"]))
    assert "built before" in capsys.readouterr().out
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1
    # another split of the same samples (a dev split, a thinned pool) reads the same cache; a drawn part does not
    fit(resolve([*steps, "data.dev_size=30", "data.pool_imbalance_ratio=3", f"output_dir={tmp_path / 'c'}"]))
    assert "built before" in capsys.readouterr().out
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1
    # the encoder's weights are the pretrained ones, kept in the checkpoint: the model loads like any run
    import shutil

    import dmssl
    from dmssl.checkpoint import list_checkpoints, load_checkpoint

    clf = dmssl.load(tmp_path / "a")
    from modalities.image import load_digits

    raw = load_digits(seed=0)
    predicted = clf.predict(raw.test)
    confusion = np.array(json.loads((tmp_path / "a" / "confusion_matrix.json").read_text())["matrix"])
    agree = confusion.trace() / confusion.sum()
    assert abs((predicted == np.array(raw.test_labels)).mean() - agree) < 0.02  # fp16 cache vs fp32 encoder
    shutil.copytree(tmp_path / "a", tmp_path / "resumed")
    for path in list_checkpoints(tmp_path / "resumed" / "checkpoints")[1:]:
        path.unlink()
    fit(resolve([*steps, f"output_dir={tmp_path / 'resumed'}", "resume=auto"]))
    a_state = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    b_state = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])
    a, b = a_state["model"], b_state["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The frozen encoder is stored once: the EMA names its weights as the model's instead of holding a copy.
    from dmssl.checkpoint import ema_weights

    encoder_keys = [k for k in a if k.startswith("encoder.")]
    shared = a_state["ema"]["same_as_model"]
    assert encoder_keys and set(encoder_keys) <= set(shared)
    assert not any(k.startswith("encoder.") for k in a_state["ema"]["module"])
    assert "prototype_weights" in a_state["ema"]["module"]  # trained entries keep their own average
    full_a, full_b = ema_weights(a_state), ema_weights(b_state)
    assert set(full_a) == set(a) and all(torch.equal(full_a[k], full_b[k]) for k in full_a)


def test_cached_views_zero_trains_the_frozen_encoder_without_a_cache(tmp_path, capsys):
    summary = fit(resolve([*Q, "model.freeze=all", "model.cached_views=0", f"data.cache_dir={tmp_path / 'cache'}",
                           f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 6 and not (tmp_path / "cache").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "feature cache" not in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("model.freeze=-1", "model.freeze=-1 must be none, all, or a number of blocks >= 0"),
    ("model.freeze=some", "model.freeze='some' is not"),
    ("model.cached_views=-2", "model.cached_views=-2 must be >= 0"),
])
def test_bad_freeze_and_cache_settings(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve([*Q, override])


def test_a_bf16_cache_is_its_own_and_an_existing_cache_is_used_before_anything_is_measured(tmp_path):
    cfg = resolve([*Q, f"data.cache_dir={tmp_path / 'cache'}", "model.freeze=all"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    torch.manual_seed(0)
    encoder = adapter.build_encoder()
    apply_freeze(encoder, "all")
    lines = []

    def build(precision):
        return open_or_build(adapter, raw, encoder, 1, cfg.data.cache_dir, torch.device("cpu"), 256,
                             log=lines.append, precision=precision)

    bf16 = build("bf16")
    assert json.loads((bf16.folder / "header.json").read_text())["key"]["computed_in"] == "bfloat16"
    assert "bf16" in lines[-1]
    # asked for fp32 now: the complete bf16 cache of the same data is used, nothing is built or measured
    assert build(lambda: pytest.fail("measured although a cache exists")).folder == bf16.folder
    import shutil

    shutil.rmtree(bf16.folder)
    fp32 = build("no")
    assert fp32.folder != bf16.folder
    a, b = np.asarray(fp32.train, dtype=np.float32), np.asarray(bf16.train, dtype=np.float32)
    assert a.shape == b.shape and np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # bf16 keeps ~3 digits


def test_auto_chooses_the_caching_format_by_measuring(monkeypatch, tmp_path, capsys):
    import dmssl.precision as precision

    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["amx_bf16"])
    monkeypatch.setattr(precision, "time_candidates", lambda measure, candidates, **o: (
        [measure(c) for c in candidates], {"no": 0.2, "bf16": 0.1})[1])
    fit(resolve([*Q, "trainer.mixed_precision=auto", "model.freeze=all", "model.cached_views=1",
                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    assert "feature cache: encoding in bf16 (auto: this CPU has amx_bf16; measured" in out
    header = json.loads(next((tmp_path / "cache").glob("features-*/header.json")).read_text())
    assert header["key"]["computed_in"] == "bfloat16"
