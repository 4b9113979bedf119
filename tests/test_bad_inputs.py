"""Bad input, table-driven: each case exits with code 2 and one message that names the bad value."""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from dmssl.cli import main
from tests.modalities.test_text import tiny_bert  # noqa: F401 - fixture

Q = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "trainer.max_steps=2"]


def png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path, tiny_bert):  # noqa: F811
    """Small broken data sets (synthetic files)."""
    (tmp_path / "empty").mkdir()
    png(tmp_path / "mismatch/train/cat/0.png", 10)
    png(tmp_path / "mismatch/train/dog/0.png", 200)
    png(tmp_path / "mismatch/test/bird/0.png", 90)
    for split in ("train", "test"):
        (tmp_path / f"broken/{split}/cat").mkdir(parents=True)
        (tmp_path / f"broken/{split}/cat/0.png").write_bytes(b"not a png")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1/train.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    (tmp_path / "latin1/test.jsonl").write_text('{"text": "ok", "label": 1}\n')
    (tmp_path / "emptytext").mkdir()
    (tmp_path / "emptytext/train.jsonl").write_text('{"text": "", "label": 0}\n')
    (tmp_path / "emptytext/test.jsonl").write_text('{"text": "fine", "label": 0}\n')
    (tmp_path / "threeclass").mkdir()
    rows = [{"text": f"good w{i}", "label": i % 2} for i in range(8)]
    (tmp_path / "threeclass/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "threeclass/test.jsonl.gz").write_bytes(gzip.compress(b'{"text": "bad", "label": 0}\n'))
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio/readme.wav").write_bytes(b"")
    (tmp_path / "other-run").mkdir()
    (tmp_path / "other-run/config.yaml").write_text("recipe: quickstart\n")
    (tmp_path / "other-run/metrics.jsonl").write_text('{"step": 2}\n')  # it trained: a run to protect
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    (tmp_path / "latin1.yaml").write_bytes(b"recipe: caf\xe9\n")
    (tmp_path / "numeric-keys.yaml").write_text("1: 2\n")
    (tmp_path / "a-list.yaml").write_text("- trainer\n- data\n")
    (tmp_path / "deep.yaml").write_text("a: " * 1000 + "1\n")
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


TEXT = ["recipe=text_sentiment", "trainer.progress_bar=false", "data.num_workers=0", "trainer.max_steps=2"]

CASES = [
    (["recipe=nope"], "'nope'"),
    ([*Q, "trainer.max_stesp=5"], "did you mean 'trainer.max_steps'"),
    ([*Q, "trainer.max_steps=abc"], "trainer.max_steps='abc' is not an int"),
    ([*Q, "trainer.lr=fast"], "trainer.lr='fast' is not a float"),
    ([*Q, "pseudo_label.threshold=0"], "pseudo_label.threshold=0.0 must be in (0, 1]"),
    ([*Q, "pseudo_label.threshold=1.2"], "pseudo_label.threshold=1.2"),
    ([*Q, "objective.pseudo_label_threshold=0.9"], "objective.pseudo_label_threshold was renamed: use pseudo_label.threshold=0.9"),
    ([*Q, "trainer.lr=nan"], "trainer.lr=nan must be a finite number"),
    ([*Q, "objective.lambda_dm=inf"], "objective.lambda_dm=inf must be a finite number"),
    ([*Q, "objective.name=fixmatch", "objective.lambda_dm=2"], "objective.lambda_dm is an option of objective.name=dmssl, not of objective.name=fixmatch"),
    ([*Q, "pseudo_label.name=freemach"], "unknown pseudo-labeller 'freemach'; did you mean 'freematch'?"),
    ([*Q, "pseudo_label.name=softmatch", "pseudo_label.n_sigma=0"], "pseudo_label.n_sigma=0.0 must be > 0"),
    ([*Q, "distance.kernel=gausian"], "unknown kernel 'gausian'; did you mean 'gaussian'?"),
    ([*Q, "data.mu=0"], "data.mu=0 must be > 0"),
    ([*Q, "model.encoder=resnet9000"], "model.encoder='resnet9000' is not an encoder of modality 'image'"),
    (["recipe=audio_fsdd", "modality.label_pattern=(unclosed"], "modality.label_pattern='(unclosed' is not a regex"),
    (["recipe=audio_fsdd", "modality.label_pattern=no_group"], "modality.label_pattern='no_group' has no group"),
    (["recipe=audio_fsdd", "modality.group_pattern=speaker"], "modality.group_pattern='speaker' has no group"),
    (["recipe=audio_fsdd", "data.dataset=speechcommands", "modality.group_pattern=_(x)"],
     "modality.group_pattern works on file names, with data.dataset=folder"),
    (["recipe=quickstart", "data.labeled_groups=[]"], "data.labeled_groups=[] names no group"),
    (["recipe=quickstart", "modality.group_pattern=^(x)"], "group_pattern works on the file paths of an image folder"),
    (["recipe=quickstart", "data.pool_imbalance_ratio=0.5"], "data.pool_imbalance_ratio=0.5 must be >= 1"),
    (["recipe=audio_fsdd", "data.label_pattern=^(x)"], "data.label_pattern was renamed: use modality.label_pattern=^(x)"),
    ([*TEXT, "model.name=bert-base-uncased"], "model.name was renamed: use modality.pretrained=bert-base-uncased"),
    ([*Q, "data.mu=-2"], "data.mu=-2"),
    ([*Q, "data.batch_size=0"], "data.batch_size=0"),
    ([*Q, "distance.name=emd"], "distance.name='emd': unknown distance 'emd'"),
    ([*Q, "distance.kernel=rbf"], "distance.kernel='rbf'"),
    ([*Q, "objective.name=mixmatch"], "objective.name='mixmatch': unknown objective"),
    ([*Q, "modality.name=nosuch"], "unknown modality 'nosuch'"),
    ([*Q, "modality.hflip=maybe"], "modality.hflip='maybe' is not a bool"),
    ([*Q, "trainer.ema_decay=1.5"], "trainer.ema_decay=1.5"),
    ([*Q, "distance.bandwidths=[-1]"], "distance.bandwidths=[-1.0]"),
    ([*Q, "data.labels_per_class=null", "data.num_labels=13"], "data.num_labels=13 is not divisible by the 10 classes"),
    ([*Q, "data.labels_per_class=1000"], "fewer than the 1000 per class"),
    ([*Q, "resume=/no/such/checkpoint.pt"], "resume='/no/such/checkpoint.pt'"),
    ([*Q, "output_dir={tmp}/other-run"], "other-run' already holds a run"),
    ([*Q, "output_dir={tmp}/fresh", "resume={tmp}/corrupt.pt"], "corrupt.pt' cannot be read"),
    (["recipe=image_cifar10", "data.root={tmp}/no-such-folder"], "no-such-folder' does not exist"),
    (["recipe=image_cifar10", "data.root={tmp}/empty"], "no readable images under"),
    (["recipe=image_cifar10", "data.root={tmp}/mismatch", "data.num_labels=null"], "test classes ['bird'] have no training images"),
    (["recipe=image_cifar10", "data.root={tmp}/broken"], "no readable images under"),
    ([*Q, "model.encoder=vit"], "model.encoder='vit' is not an encoder of modality 'image'"),
    ([*TEXT, "data.root={tmp}/latin1", "modality.pretrained={bert}"], "latin1/train.jsonl is not UTF-8 text (line 1"),
    ([*TEXT, "data.root={tmp}/emptytext", "modality.pretrained={bert}"], "the training set is empty"),
    ([*TEXT, "data.root={tmp}/threeclass", "modality.pretrained={bert}", "modality.class_names=[a,b,c]",
      "data.labels_per_class=1"], "classes with no labeled training sample: ['c']"),
    ([*TEXT, "data.root={tmp}/threeclass", "modality.pretrained=no-such-org/no-such-model"], "'no-such-org/no-such-model' is not available offline"),
    ([*TEXT, "data.root={tmp}/nowhere"], "nowhere' is not a folder"),
    (["recipe=audio_fsdd", "data.root={tmp}/audio"], "no readable, labeled audio files"),
    (["recipe=audio_fsdd", "data.root={tmp}/audio", "modality.test_pattern=[unclosed"], "modality.test_pattern='[unclosed'"),
    (["recipe={tmp}/latin1.yaml"], "latin1.yaml' is not UTF-8 text"),
    (["recipe={tmp}/numeric-keys.yaml"], "the key 1 at the top is not a name"),
    (["recipe={tmp}/a-list.yaml"], "must be a mapping of sections, got list"),
    (["recipe={tmp}/deep.yaml"], "deep.yaml"),
    (["recipe=" + "x" * 300], "unknown recipe 'xxxx"),
    ([*Q, "output_dir={tmp}/a-file"], "a-file' is a file; give a folder"),
    ([*Q, "output_dir={tmp}/a-file/run"], "is under '{tmp}/a-file', which is a file"),
    ([*Q, "trainer.cosine_cycles=0.75"], "trainer.cosine_cycles=0.75 must be in (0, 0.5]"),
    ([*Q, "trainer.momentum=0"], "trainer.momentum=0.0 must be >= 0, and > 0 with trainer.nesterov=true"),
    ([*Q, "distance.bandwidths=[]"], "distance.bandwidths=[] must be null"),
    ([*Q, "seed=99999999999999999999999"], "seed=99999999999999999999999 must be in [0, 2**32)"),
    ([*Q, "model.depth=28"], "model.depth=28 is not used by model.encoder='small_cnn'"),
    ([*Q, "plugins=[.foo]"], "plugins: '.foo' is not a Python module name"),
    ([*Q, "plugins=[tests.no_such_plugin_module]"], "plugins: cannot import 'tests.no_such_plugin_module'"),
    ([*Q, "modality.name=:"], "modality.name=':' is not package.module:ClassName"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_exits_2_and_names_the_value(argv, message, folders, tiny_bert, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(folders)  # runs without output_dir land in the temporary folder
    argv = [a.format(tmp=folders, bert=tiny_bert) for a in argv]
    message = message.format(tmp=folders)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_plot_of_a_rejected_folder_creates_nothing_in_it(trained, capsys):
    from dmssl.cli import console

    assert console(["plot", str(trained / "no-images")]) == 2
    assert not (trained / "no-images" / "plots").exists()


def test_a_torn_last_metrics_line_neither_blocks_plot_nor_resume(trained, tmp_path, capsys):
    import shutil

    from dmssl.cli import console

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "test_acc')  # killed mid-line
    assert console(["plot", str(run)]) == 0, capsys.readouterr().err
    assert main([*Q, "trainer.max_steps=4", f"output_dir={run}", "resume=auto"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_ones(tmp_path, capsys, monkeypatch):
    import shutil

    import torch

    import dmssl.checkpoint

    real_save = torch.save
    calls = []

    def full_after_first(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed; unexpected pos 1234 vs 5678")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(dmssl.checkpoint.torch, "save", full_after_first)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    code = main([*Q, "trainer.max_steps=4", "trainer.checkpoint_every=2", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "step_00000004.pt' could not be written (the disk is full)" in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002.pt"]


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("override", ["model.encoder=resnet9000", "trainer.lr=nan", "data.dev_size=-1",
                                      "objective.lambda_dm=inf", "pseudo_label.name=nosuch", "distance.kernel=rbf"])
def test_config_errors_come_before_any_data_is_read(override, monkeypatch):
    """These stop in `resolve`, which reads recipes only: an adapter's `load` would fail the test if called."""
    from dmssl.errors import ConfigError
    from dmssl.recipe import resolve
    from modalities.image import ImageModality

    def no_load(self):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(ImageModality, "load", no_load)
    with pytest.raises(ConfigError):
        resolve(["recipe=image_cifar10", "data.root=/nonexistent.tar.gz", override])


# ---------------------------------------------------------------- predict, export, and data.dataset=hf


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step quickstart run, its export with the weights file overwritten by garbage, and small broken inputs."""
    import datasets

    from dmssl.export import export

    tmp = tmp_path_factory.mktemp("trained")
    assert main([*Q, f"output_dir={tmp / 'run'}"]) == 0
    export(tmp / "run", tmp / "corrupt-export")
    (tmp / "corrupt-export/model.safetensors").write_bytes(b"not safetensors")
    (tmp / "bad-checkpoint/checkpoints").mkdir(parents=True)
    (tmp / "bad-checkpoint/config.yaml").write_text((tmp / "run/config.yaml").read_text())
    (tmp / "bad-checkpoint/checkpoints/step_00000002.pt").write_bytes(b"\x80\x02garbage")
    png(tmp / "digit.png", 128)
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "no-images").mkdir()
    (tmp / "no-images/notes.txt").write_text("nothing here\n")
    (tmp / "full").mkdir()
    (tmp / "full/keep.txt").write_text("keep me")
    images = {"image": [{"bytes": (tmp / "digit.png").read_bytes(), "path": None}] * 4, "label": [0, 1, 0, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(images)}).save_to_disk(tmp / "hf-no-test")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"picture": images["image"], "label": [0, 1, 0, 1]}),
                          "test": datasets.Dataset.from_dict({"picture": images["image"][:2], "label": [0, 1]})}
                         ).save_to_disk(tmp / "hf-other-column")
    return tmp


USE_CASES = [
    (["predict", "{t}/nowhere", "{t}/digit.png"], "'{t}/nowhere' is not a dmssl run folder or export: no such folder"),
    (["predict", "{t}/no-images", "{t}/digit.png"], "'{t}/no-images' is not a dmssl run folder or export: it has no config.yaml"),
    (["predict", "{t}/bad-checkpoint", "{t}/digit.png"], "has no readable checkpoint in checkpoints/"),
    (["predict", "{t}/corrupt-export", "{t}/digit.png"], "model.safetensors cannot be read"),
    (["predict", "{t}/run", "{t}/notes.txt"], "notes.txt is not a readable image"),
    (["predict", "{t}/run", "{t}/empty.png"], "empty.png is empty"),
    (["predict", "{t}/run", "{t}/no-images"], "no-images holds no file this image model reads (file types: .png"),
    (["predict", "{t}/run", "{t}/missing.png"], "missing.png does not exist"),
    (["predict", "{t}/run", "{t}/digit.png", "--output", "{t}/preds.xlsx"], "the file type must be .csv or .jsonl"),
    (["predict", "{t}/run", "{t}/digit.png", "--top-k", "0"], "--top-k=0 must be >= 1"),
    (["export", "{t}/bad-checkpoint", "{t}/out"], "has no readable checkpoint in checkpoints/"),
    (["export", "{t}/run", "{t}/full"], "'{t}/full' exists and is not empty; pass --overwrite"),
    (["export", "{t}/run", "{t}/run"], "the export folder must differ from the run folder"),
    (["train", *Q, "output_dir={t}/hf-run", "overwrite=true", "data.dataset=hf"], "data.dataset=hf needs data.root"),
    (["train", *Q, "output_dir={t}/hf-run", "overwrite=true", "data.dataset=hf", "data.root={t}/hf-no-test"], "the data set has no split 'test'; its splits: train"),
    (["train", *Q, "output_dir={t}/hf-run", "overwrite=true", "data.dataset=hf", "data.root={t}/hf-other-column"], "split 'train' has no column 'image'; its columns: picture, label"),
    (["train", *Q, "output_dir={t}/hf-run", "overwrite=true", "data.dataset=hf", "data.root={t}/nowhere"], "data.root='{t}/nowhere' does not exist"),
    (["train", *Q, "output_dir={t}/hf-run", "overwrite=true", "data.dataset=hf", "data.root={t}/no-images"], "holds no save_to_disk data set and no .parquet or .arrow file"),
    (["plotx", "{t}/run"], "unknown command 'plotx'; did you mean 'plot'?"),
    (["plot", "{t}/nowhere"], "'{t}/nowhere' is not a folder"),
    (["plot", "{t}/no-images"], "no-images has no metrics.jsonl records"),
    (["plot", "{t}/run", "{t}/bad-checkpoint", "--compare", "{t}/cmp.png"], "bad-checkpoint has no metrics.jsonl records"),
    (["predict", "{t}/run", "{t}/digit.png", "--output", "{t}/no-such-folder/p.csv"], "no-such-folder' does not exist"),
    (["predict", "{t}/run", "{t}/table.csv", "--output", "{t}/table.csv"], "is one of the inputs"),
    (["export", "{t}/run", "{t}", "--overwrite"], "is the working folder or holds it"),
    (["export", "{t}/run", "{t}/full", "--overwrite"], "is not a dmssl export"),
]


@pytest.mark.parametrize(("argv", "message"), USE_CASES, ids=[f"use{i:02d}" for i in range(len(USE_CASES))])
def test_bad_input_of_predict_export_and_hf_data_exits_2(argv, message, trained, capsys, monkeypatch):
    from dmssl.cli import console

    monkeypatch.chdir(trained)
    code = console([a.format(t=trained) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.format(t=trained) in lines[0], err
    assert not (trained / "out").exists()  # a failed export leaves nothing behind
