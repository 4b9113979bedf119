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
