"""The labeled split and step assembly."""

import pytest
import torch

from dmssl.config import DataConfig, ModelConfig
from dmssl.data import SampleStream, StepDataset, split_labeled
from dmssl.errors import DataError
from modalities.image import ImageModality, ImageOptions

LABELS = [i % 4 for i in range(40)] + [-1] * 5


def test_split_labeled__balanced_seeded_and_known_only():
    chosen = split_labeled(LABELS, 4, num_labels=8, seed=1)
    assert len(chosen) == 8
    assert sorted(LABELS[i] for i in chosen) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chosen == split_labeled(LABELS, 4, labels_per_class=2, seed=1)
    assert chosen != split_labeled(LABELS, 4, num_labels=8, seed=2)
    assert all(LABELS[i] >= 0 for i in split_labeled(LABELS, 4))


def test_split_labeled__errors():
    with pytest.raises(DataError, match="num_labels=10 is not divisible by the 4 classes"):
        split_labeled(LABELS, 4, num_labels=10)
    with pytest.raises(DataError, match="class 0 has 10 labeled samples, fewer than the 11"):
        split_labeled(LABELS, 4, labels_per_class=11)


def test_sample_stream__each_epoch_is_a_permutation():
    stream = SampleStream(10, seed=3)
    first, second = stream.take(0, 10), stream.take(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert stream.take(5, 10) == first[5:] + second[:5]


def make_steps(rank=0, world=1, batch=4):
    adapter = ImageModality(ImageOptions(), DataConfig(), ModelConfig())
    images = torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8)  # synthetic images
    labels = [i % 3 for i in range(30)]
    return StepDataset(adapter, images[:12], labels[:12], images, labels, batch_size=batch, mu=2,
                       unlabeled_views=("weak", "strong", "strong"), num_steps=10, seed=0, rank=rank, world_size=world)


def test_step_dataset__deterministic_layout_and_shapes():
    steps = make_steps()
    item = steps[3]
    assert item["inputs"].shape == (4 + 3 * 8, 3, 8, 8)
    assert item["labels"].shape == (4,) and item["num_unlabeled"] == 8
    assert torch.equal(item["inputs"], steps[3]["inputs"])  # same step, same views
    assert not torch.equal(item["inputs"], steps[4]["inputs"])


def test_step_dataset__two_processes_split_the_global_step():
    global_step = make_steps(batch=4)
    ranks = [make_steps(rank=r, world=2, batch=2) for r in range(2)]
    # The global stream position of step s, rank r starts at (2s + r) * 2 labeled samples.
    labeled_single = global_step.labeled_stream.take(0, 8)
    labeled_split = ranks[0].labeled_stream.take(0, 2) + ranks[1].labeled_stream.take(2, 2)
    assert labeled_split == labeled_single[:4]


def test_split_dev__disjoint_from_labeled_seeded_and_sized():
    from dmssl.data import split_dev, split_labeled

    labels = [i % 4 for i in range(200)] + [-1] * 50  # 50 samples of unknown label
    labeled = split_labeled(labels, 4, labels_per_class=5, seed=0)
    dev = split_dev(labels, labeled, 30, seed=1)
    assert len(dev) == 30 and len(set(dev)) == 30
    assert not set(dev) & set(labeled)
    assert all(labels[i] >= 0 for i in dev)
    assert dev == split_dev(labels, labeled, 30, seed=1) and dev != split_dev(labels, labeled, 30, seed=2)
    assert split_dev(labels, labeled, 0, seed=1) == []
    import pytest

    from dmssl.errors import DataError

    with pytest.raises(DataError, match="data.dev_size=500 is more than the 180"):
        split_dev(labels, labeled, 500, seed=1)


def test_fit__dev_split_is_evaluated_and_never_trained_on(tmp_path, monkeypatch):
    import json

    import dmssl.trainer as trainer
    from dmssl.recipe import resolve

    seen = {}
    real_step_dataset = trainer.StepDataset

    def recording(adapter, labeled, labels, unlabeled, unlabeled_labels, *args, **kwargs):
        seen["labeled"], seen["unlabeled"] = labeled, unlabeled
        return real_step_dataset(adapter, labeled, labels, unlabeled, unlabeled_labels, *args, **kwargs)

    real_eval_dataset = trainer.EvalDataset
    evaluated = []

    def recording_eval(adapter, samples, labels):
        evaluated.append(samples)
        return real_eval_dataset(adapter, samples, labels)

    monkeypatch.setattr(trainer, "StepDataset", recording)
    monkeypatch.setattr(trainer, "EvalDataset", recording_eval)
    summary = trainer.fit(resolve(["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0",
                                   "data.batch_size=8", "data.mu=2", "trainer.max_steps=4", "trainer.eval_every=2",
                                   "data.dev_size=100", "trainer.save_embeddings=false", f"output_dir={tmp_path}"]))
    test_samples, dev_samples = evaluated
    assert summary["num_dev"] == 100 and len(dev_samples) == 100 and 0 <= summary["dev_accuracy"] <= 1
    trained = {s.numpy().tobytes() for s in seen["labeled"]} | {s.numpy().tobytes() for s in seen["unlabeled"]}
    assert not {s.numpy().tobytes() for s in dev_samples} & trained  # digits has no exact duplicates
    assert summary["num_unlabeled"] == 1297 - 100
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("dev_accuracy" in r and "test_accuracy" in r for r in records)


def grouped_raw(unlabeled=()):
    """Synthetic: 4 classes x 3 groups x 10 samples; sample i is the integer i, so splits can be read back."""
    from dmssl.modality import RawData

    train = list(range(120))
    labels = [i % 4 for i in train]
    groups = [("a", "b", "c")[(i // 4) % 3] for i in train]
    test = list(range(1000, 1060))
    return RawData(train=train, train_labels=labels, test=test, test_labels=[i % 4 for i in test],
                   class_names=["w", "x", "y", "z"], unlabeled=list(unlabeled),
                   train_groups=groups, test_groups=[("a", "b", "c")[(i // 4) % 3] for i in test])


def grouped_config(*overrides):
    from dmssl.recipe import resolve

    return resolve(["recipe=quickstart", "data.labels_per_class=2", "data.dev_size=12", *overrides])


def test_split_run_data__groups_put_labels_on_one_side_and_the_rest_on_the_other():
    from dmssl.trainer import split_run_data

    raw = grouped_raw()
    group_of = dict(zip(raw.train, raw.train_groups, strict=True)) | dict(zip(raw.test, raw.test_groups, strict=True))
    data = split_run_data(raw, grouped_config("data.labeled_groups=[a]", "data.target_groups=[b,c]"))
    assert {group_of[s] for s in data.labeled} == {"a"} and sorted(data.labeled_labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {group_of[s] for s in data.dev} == {"b", "c"} and len(data.dev) == 12
    assert {group_of[s] for s, _ in data.pool} == {"b", "c"} and len(data.pool) == 80 - 12
    assert not {s for s, _ in data.pool} & set(data.dev)
    assert {group_of[s] for s in data.test} == {"b", "c"} and len(data.test) == 40
    # labeled groups only: the pool, dev and test are everything else, as without groups
    data = split_run_data(raw, grouped_config("data.labeled_groups=[c]"))
    assert {group_of[s] for s in data.labeled} == {"c"} and len(data.test) == 60
    assert len(data.pool) == 120 - 12 and not set(data.labeled) & set(data.dev)
    # an adapter that groups only its training samples can still restrict the labeled side
    from dataclasses import replace

    assert len(split_run_data(replace(raw, test_groups=None), grouped_config("data.labeled_groups=[c]")).test) == 60
    # samples held as one tensor (as the image adapter keeps them) split the same way
    import torch

    as_tensors = replace(raw, test=torch.tensor(raw.test))
    assert len(split_run_data(as_tensors, grouped_config("data.labeled_groups=[a]", "data.target_groups=[b,c]")).test) == 40


def test_split_run_data__without_groups_the_draws_do_not_change():
    from dmssl.data import seeded_subset, split_dev, split_labeled
    from dmssl.trainer import split_run_data

    raw = grouped_raw()
    cfg = grouped_config("seed=3", "data.max_unlabeled=50", "data.test_subset=20")
    data = split_run_data(raw, cfg)
    labeled = split_labeled(raw.train_labels, 4, labels_per_class=2, seed=3)
    dev = split_dev(raw.train_labels, labeled, 12, 8)
    pool = [i for i in raw.train if i not in dev]
    assert data.labeled_indices == labeled and data.dev == dev
    assert [s for s, _ in data.pool] == [pool[i] for i in seeded_subset(len(pool), 50, 10)]
    assert data.test == [raw.test[i] for i in seeded_subset(60, 20, 14)]


@pytest.mark.parametrize(("overrides", "unlabeled", "message"), [
    (["data.labeled_groups=[a,d]"], (), r"data.labeled_groups names unknown groups \['d'\]; allowed: a, b, c"),
    (["data.target_groups=[b]"], (7,), "unlabeled samples with no group"),
])
def test_split_run_data__group_errors_name_the_setting(overrides, unlabeled, message):
    from dmssl.trainer import split_run_data

    with pytest.raises(DataError, match=message):
        split_run_data(grouped_raw(unlabeled), grouped_config(*overrides))


def test_split_run_data__groups_asked_of_data_without_them():
    from dataclasses import replace

    from dmssl.trainer import split_run_data

    with pytest.raises(DataError, match=r"data.target_groups=\['a'\] needs a group per sample.*modality.group_pattern"):
        split_run_data(replace(grouped_raw(), train_groups=None, test_groups=None),
                       grouped_config("data.target_groups=[a]"))


def test_long_tailed__class_counts_fall_exponentially_and_the_draw_is_seeded():
    from dmssl.data import long_tailed

    labels = [k for k in range(4) for _ in range(30)] + [0] * 10  # class 0 has 40, the others 30
    kept = long_tailed(labels, 4, 8.0, seed=1)
    counts = [sum(labels[i] == k for i in kept) for k in range(4)]
    assert counts == [30, 15, 7, 3]  # floor(30 * 8 ** (-k / 3)): 30, 15, 7.5, 3.75
    assert kept == sorted(set(kept)) and kept == long_tailed(labels, 4, 8.0, seed=1)
    assert kept != long_tailed(labels, 4, 8.0, seed=2)
    assert [sum(labels[i] == k for i in long_tailed(labels, 4, 1000.0, 0)) for k in range(4)] == [30, 3, 1, 1]
    with pytest.raises(DataError, match="unknown class"):
        long_tailed([0, 1, -1], 2, 2.0, seed=0)


def test_split_run_data__pool_imbalance_thins_only_the_pool():
    from dmssl.trainer import split_run_data

    raw = grouped_raw()
    balanced = split_run_data(raw, grouped_config())
    tailed = split_run_data(raw, grouped_config("data.pool_imbalance_ratio=10"))
    assert (tailed.labeled, tailed.dev, tailed.test) == (balanced.labeled, balanced.dev, balanced.test)
    pool_counts = [sum(y == k for _, y in balanced.pool) for k in range(4)]
    counts = [sum(y == k for _, y in tailed.pool) for k in range(4)]
    n_min = min(pool_counts)
    assert counts == [int(n_min * 10 ** (-k / 3)) for k in range(4)] and counts[0] > counts[3] > 0
    assert {s for s, _ in tailed.pool} <= {s for s, _ in balanced.pool}
    with pytest.raises(DataError, match="unknown class"):
        split_run_data(grouped_raw(unlabeled=(7,)), grouped_config("data.pool_imbalance_ratio=2"))
