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
