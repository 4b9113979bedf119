"""Batched image views: each transform does per image what its definition says, and RandAugment's
operations equal torchvision's. Images here are synthetic random bytes unless stated."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from dmssl.data import StepDataset, seeded_rng
from dmssl.recipe import resolve
from modalities.image import ImageModality
from modalities.image_augment import RANDAUGMENT_OPERATIONS, cutout, rand_augment, random_crop, random_hflip


def random_images(n=24, c=3, size=16, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_random_hflip__mirrors_some_images_and_keeps_the_rest():
    images = random_images()
    torch.manual_seed(0)
    out = random_hflip(images)
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, images, strict=True)]
    kept = [torch.equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < len(images)


def test_random_crop__every_image_is_a_window_of_its_reflect_padded_self():
    images, padding = random_images(size=8), 2
    torch.manual_seed(0)
    out = random_crop(images, padding)
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = set()
    for o, p in zip(out, padded, strict=True):
        windows = [(y, x) for y in range(2 * padding + 1) for x in range(2 * padding + 1)
                   if torch.equal(o, p[:, y:y + 8, x:x + 8])]
        assert windows, "a crop that is no window of the padded image"
        offsets.add(windows[0])
    assert len(offsets) > 3  # offsets are drawn per image, not once for the batch


def test_cutout__greys_one_square_per_image_and_nothing_else():
    images = random_images(n=32, size=16) | 1  # odd bytes, so no pixel is 127 before the cutout
    torch.manual_seed(0)
    out = cutout(images, 0.25)
    for o, x in zip(out, images, strict=True):
        grey = (o != x).any(0)
        rows, cols = grey.any(1).nonzero().squeeze(1), grey.any(0).nonzero().squeeze(1)
        assert (o[:, grey] == 127).all()
        assert grey.sum() == len(rows) * len(cols)  # one rectangle
        assert len(rows) <= 4 and len(cols) <= 4  # side 0.25 * 16, clipped at the border
    assert len({tuple((o != x).any(0).nonzero()[0].tolist()) for o, x in zip(out, images, strict=True)}) > 5


@pytest.mark.parametrize("name", list(RANDAUGMENT_OPERATIONS))
def test_randaugment_operation__equals_torchvisions_on_every_image_of_a_batch(name):
    operation, table, signed = RANDAUGMENT_OPERATIONS[name]
    reference_table, reference_signed = v2.RandAugment._AUGMENTATION_SPACE[name]
    assert signed == reference_signed
    reference = v2.RandAugment()
    images = random_images(n=6, size=32)
    for magnitude in (9, 30):
        value = float(table(32, 32)[magnitude]) if table is not None else 0.0
        assert value == (float(reference_table(31, 32, 32)[magnitude]) if table is not None else 0.0)
        for sign in (1.0, -1.0) if signed else (1.0,):
            expected = torch.stack([
                reference._apply_image_or_video_transform(x, name, sign * value, interpolation=reference.interpolation,
                                                           fill=reference._fill) for x in images])
            assert torch.equal(operation(images, sign * value), expected)


def test_rand_augment__each_image_gets_one_whole_operation_of_the_table():
    images = random_images(n=64, size=16)
    torch.manual_seed(0)
    out = rand_augment(images, num_ops=1, magnitude=9)
    candidates_per_image = []
    for o, x in zip(out, images, strict=True):
        matches = set()
        for name, (operation, table, signed) in RANDAUGMENT_OPERATIONS.items():
            value = float(table(16, 16)[9]) if table is not None else 0.0
            for sign in (1.0, -1.0) if signed else (1.0,):
                if torch.equal(operation(x[None], sign * value)[0], o):
                    matches.add(name)
        assert matches, "an output that no single operation produces"
        candidates_per_image.append(matches)
    assert len(set().union(*candidates_per_image)) >= 8  # many operations in one batch, not one for all


def test_rand_augment__rejects_a_magnitude_outside_the_table():
    with pytest.raises(ValueError, match="magnitude=31"):
        rand_augment(random_images(n=2), num_ops=1, magnitude=31)


def adapter(*overrides):
    cfg = resolve(["recipe=quickstart", *overrides])
    return ImageModality(cfg.modality.options, cfg.data, cfg.model)


def test_views__batched_and_per_image_paths_draw_the_same_kind_of_view():
    a = adapter("modality.hflip=true")
    images = list(random_images(n=16, size=8, c=1))
    with seeded_rng(0):
        batched = a.strong_views(images)
    with seeded_rng(0):
        again = a.strong_views(images)
    with seeded_rng(0):
        single = a.strong(images[0])
    assert all(torch.equal(x, y) for x, y in zip(batched, again, strict=True))
    assert [v.shape for v in batched] == [x.shape for x in images] and all(v.dtype == torch.uint8 for v in batched)
    assert single.shape == images[0].shape
    assert sum(not torch.equal(v, x) for v, x in zip(batched, images, strict=True)) >= 14


def test_views__images_of_different_sizes_are_viewed_one_size_at_a_time():
    a = adapter()
    images = [*random_images(n=3, size=8, c=1), *random_images(n=2, size=12, c=1)]
    with seeded_rng(0):
        views = a.weak_views(images)
    assert [tuple(v.shape) for v in views] == [tuple(x.shape) for x in images]


def test_step_dataset__builds_image_steps_with_the_batched_views():
    a = adapter()
    raw = a.load()
    calls = []

    class Counting(ImageModality):
        def strong_views(self, samples):
            calls.append(len(samples))
            return super().strong_views(samples)

        def strong(self, sample):
            raise AssertionError("the step should not fall back to per-image views")

    counting = Counting(a.options, a.data, a.model)
    steps = StepDataset(counting, raw.train[:40], raw.train_labels[:40], raw.train[40:], raw.train_labels[40:],
                        batch_size=4, mu=3, unlabeled_views=("weak", "strong", "strong"), num_steps=2, seed=0)
    first, again = steps[1], steps[1]
    assert calls == [12, 12, 12, 12]
    assert first["inputs"].shape == (4 + 3 * 12, 1, 8, 8)
    assert torch.equal(first["inputs"], again["inputs"])  # seeded per step: a resumed run sees the same step


def test_samples_from__arrays_of_any_layout_become_the_models_input():
    image = ImageModality(None, None, None)
    image.restore_inference_state({"in_channels": 1, "image_shape": [8, 8]})
    grey = torch.randint(0, 256, (8, 8), dtype=torch.uint8)
    as_hwc = grey[:, :, None].expand(8, 8, 3).numpy()  # an RGB picture of a grey image
    samples = image.samples_from([grey.numpy(), grey[None], as_hwc, grey.numpy() / 255.0])
    for sample in samples:
        assert sample.shape == (1, 8, 8) and sample.dtype == torch.uint8
        assert (sample[0].int() - grey.int()).abs().max() <= 1  # luma of equal channels, float rounding
    big = image.samples_from([torch.zeros(3, 16, 16, dtype=torch.uint8)])[0]
    assert big.shape == (1, 8, 8)
    with pytest.raises(Exception, match=r"float images must hold values in \[0, 1\]"):
        image.samples_from([np.full((8, 8), 16.0)])
    with pytest.raises(Exception, match="got shape"):
        image.samples_from([np.zeros((2, 8, 8, 3))])


@pytest.mark.slow
def test_hf_dataset__a_save_to_disk_folder_of_images_trains_offline(tmp_path):
    """Synthetic images (dark vs light squares) in a datasets folder; ClassLabel names become class names."""
    import io

    import datasets
    from PIL import Image

    from dmssl.trainer import fit

    rng = np.random.default_rng(0)

    def png(level):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["dark", "light"])})

    def split(n):
        kinds = [i % 2 for i in range(n)]
        images = [{"bytes": png(30 + 180 * k + int(rng.integers(0, 30))), "path": None} for k in kinds]
        return datasets.Dataset.from_dict({"img": images, "kind": kinds}, features=features)

    datasets.DatasetDict({"train": split(30), "test": split(10)}).save_to_disk(tmp_path / "hf")
    (tmp_path / "parquet").mkdir()
    split(30).to_parquet(tmp_path / "parquet" / "train-00000.parquet")
    split(10).to_parquet(tmp_path / "parquet" / "test-00000.parquet")
    for root in ("hf", "parquet"):
        summary = fit(resolve(["recipe=quickstart", "data.dataset=hf", f"data.root={tmp_path / root}",
                               "modality.image_column=img", "modality.label_column=kind", "data.labels_per_class=3",
                               "data.batch_size=6", "data.mu=1", "data.num_workers=0", "trainer.max_steps=3",
                               "trainer.progress_bar=false", f"output_dir={tmp_path / ('run-' + root)}"]))
        assert summary["class_names"] == ["dark", "light"] and summary["num_test"] == 10 and summary["num_labeled"] == 6


def test_image_folder__groups_from_paths_and_the_cache_keeps_them(tmp_path):
    """Synthetic PNGs in <domain>/{train,test}/<class>/: each image's group is its domain folder."""
    from PIL import Image

    from dmssl.config import DataConfig, ModelConfig
    from dmssl.errors import DataError
    from modalities.image import ImageOptions

    root = tmp_path / "data"
    for domain, level in (("photo", 40), ("sketch", 220)):
        for split, n in (("train", 3), ("test", 2)):
            for label in ("cat", "dog"):
                folder = root / domain / split / label
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(folder / f"{i}.png")

    def load(**options):
        data = DataConfig(dataset="folder", root=str(root), cache_dir=str(tmp_path / "cache"))
        return ImageModality(ImageOptions(**options), data, ModelConfig(encoder="small_cnn")).load()

    raw = load(group_pattern=r"^([^/]+)/")
    assert sorted(set(raw.train_groups)) == ["photo", "sketch"] and len(raw.train_groups) == len(raw.train) == 12
    # every image's group agrees with its pixels (the two domains differ in brightness)
    assert all((g == "photo") == (int(x[0, 0, 0]) == 40) for x, g in zip(raw.train, raw.train_groups))
    assert sorted(raw.test_groups) == ["photo"] * 4 + ["sketch"] * 4
    cached = load(group_pattern=r"^([^/]+)/")  # from the decode cache, with its groups
    assert cached.train_groups == raw.train_groups and cached.test_groups == raw.test_groups
    assert load().train_groups is None  # without a pattern: no groups (and its own cache entry)
    with pytest.raises(DataError, match=r"does not match modality.group_pattern='\^\(sketch\)/'"):
        load(group_pattern="^(sketch)/")


def test_group_pattern__needs_a_group_and_an_image_folder():
    from dmssl.config import DataConfig, ModelConfig
    from dmssl.errors import ConfigError
    from modalities.image import ImageOptions

    with pytest.raises(ConfigError, match="modality.group_pattern='domain' has no group"):
        ImageOptions(group_pattern="domain").validate()
    adapter = ImageModality(ImageOptions(group_pattern="^(x)"), DataConfig(dataset="digits"), ModelConfig(encoder="small_cnn"))
    with pytest.raises(ConfigError, match="group_pattern works on the file paths of an image folder"):
        adapter.load()
