"""Short runs on the real data sets kept beside the project (../shared/data), where they are present."""

import pytest

from dmssl.recipe import resolve
from dmssl.trainer import fit
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow
FSDD = SHARED_DATA / "fsdd" / "fsdd-recordings.tar.gz"
CIFAR = SHARED_DATA / "cifar10" / "cifar10-jpg.tar.gz"
COMMON = ["trainer.progress_bar=false", "data.num_workers=0", "trainer.max_steps=3", "trainer.eval_every=3"]


@pytest.mark.skipif(not FSDD.is_file(), reason="the FSDD archive is not beside the project")
def test_fsdd_recipe_on_the_real_archive(tmp_path):
    summary = fit(resolve(["recipe=audio_fsdd", f"data.root={FSDD}", "data.batch_size=4", *COMMON,
                           f"output_dir={tmp_path}"]))
    # FSDD's convention: index 0-4 of each of the 6 speakers x 10 digits is the test set.
    assert summary["num_test"] == 300 and summary["num_labeled"] == 50 and summary["num_unlabeled"] == 2700


@pytest.mark.skipif(not FSDD.is_file(), reason="the FSDD archive is not beside the project")
def test_fsdd_across_speakers(tmp_path):
    from dmssl.modality import build_adapter
    from dmssl.trainer import split_run_data

    cfg = resolve(["recipe=audio_fsdd", f"data.root={FSDD}", "data.batch_size=4", *COMMON, "data.dev_size=100",
                   r"modality.group_pattern=^\d_([a-z]+)_", "data.labeled_groups=[jackson,nicolas,theo]",
                   "data.target_groups=[yweweler,george,lucas]", f"output_dir={tmp_path}"])
    raw = build_adapter(cfg).load()
    data = split_run_data(raw, cfg)
    speaker = {id(w): g for w, g in zip(raw.train, raw.train_groups, strict=True)}
    assert {speaker[id(w)] for w in data.labeled} <= {"jackson", "nicolas", "theo"}
    assert {speaker[id(w)] for w, _ in data.pool} | {speaker[id(w)] for w in data.dev} == {"yweweler", "george", "lucas"}
    summary = fit(cfg)
    # 3 target speakers: 450 training clips each, 100 of them held out for dev; 50 test clips each
    assert summary["num_labeled"] == 50 and summary["num_unlabeled"] == 1350 - 100 and summary["num_test"] == 150


@pytest.mark.skipif(not CIFAR.is_file(), reason="the CIFAR-10 archive is not beside the project")
def test_cifar10_recipe_on_the_real_archive(tmp_path):
    summary = fit(resolve(["recipe=image_cifar10", f"data.root={CIFAR}", "model.encoder=small_cnn", "data.batch_size=8",
                           "data.mu=1", "data.test_subset=256", *COMMON, f"output_dir={tmp_path}"]))
    assert summary["num_labeled"] == 250 and summary["num_unlabeled"] == 50000 and summary["num_test"] == 256


@pytest.mark.skipif(not FSDD.is_file(), reason="the FSDD archive is not beside the project")
def test_fsdd_as_a_hugging_face_datasets_folder(tmp_path):
    """The real FSDD recordings (index 0-7 of every speaker and digit) converted once to a save_to_disk folder."""
    import re

    import datasets

    from dmssl.files import iter_data_files

    rows = {"train": {"audio": [], "label": []}, "test": {"audio": [], "label": []}}
    for parts, data in iter_data_files(FSDD, (".wav",)):
        digit, _, index = re.match(r"(\d)_([a-z]+)_(\d+)\.wav$", parts[-1]).groups()
        if int(index) < 8:
            split = rows["test" if int(index) < 5 else "train"]
            split["audio"].append({"bytes": data, "path": parts[-1]})
            split["label"].append(int(digit))
    features = datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    datasets.DatasetDict({name: datasets.Dataset.from_dict(split, features=features).cast_column("audio", datasets.Audio())
                          for name, split in rows.items()}).save_to_disk(tmp_path / "fsdd-hf")
    summary = fit(resolve(["recipe=audio_fsdd", "data.dataset=hf", f"data.root={tmp_path / 'fsdd-hf'}", "data.labels_per_class=2",
                           "data.batch_size=4", *COMMON, f"output_dir={tmp_path / 'run'}"]))
    assert summary["num_test"] == 300 and summary["num_labeled"] == 20 and summary["num_unlabeled"] == 180
    assert summary["class_names"] == [str(d) for d in range(10)]
