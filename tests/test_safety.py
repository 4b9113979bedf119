"""Nothing lost, no code run from a shared folder, no silent wrong result: what a command may delete, overwrite,
import or reuse, each case as a user or an attacker would meet it."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dmssl
from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.cli import console, main
from dmssl.errors import CheckpointError, ConfigError, DataError, RunFolderBusy, UntrustedCode
from dmssl.export import export, is_export
from dmssl.files import extract_tar_safely, remove_stale_temporaries, tree_identity
from dmssl.recipe import resolve
from dmssl.run_dir import RunLock
from dmssl.trainer import fit

# fp32 pinned wherever two runs are compared: the comparison is exact, and auto may pick bf16.
Q = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "trainer.save_embeddings=false",
     "data.batch_size=8", "data.mu=2", "trainer.mixed_precision=no"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step quickstart run folder, in a project folder that also holds other runs."""
    project = tmp_path_factory.mktemp("project")
    (project / "runs" / "older-run").mkdir(parents=True)
    (project / "runs" / "older-run" / "notes.txt").write_text("keep me")
    folder = project / "runs" / "quick"
    fit(resolve([*Q, "trainer.max_steps=4", f"output_dir={folder}"]))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1, 2: export --overwrite


@pytest.mark.parametrize("target", [".", "..", "runs", "RUN", "RUN/.."])
def test_export_overwrite_never_replaces_the_working_folder_a_parent_or_the_run(run, target, monkeypatch, capsys):
    project = run.parent.parent
    monkeypatch.chdir(project)
    before = snapshot(project)
    out = {"RUN": str(run), "RUN/..": str(run.parent)}.get(target, target)
    assert console(["export", str(run), out, "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert snapshot(project) == before  # nothing deleted, nothing added


def test_export_overwrite_refuses_a_folder_that_is_not_an_export(run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="is not a dmssl export"):
        export(run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    # an export with a file of the user's added to it is not only an export any more
    export(run, tmp_path / "exp")
    (tmp_path / "exp" / "notes.md").write_text("mine")
    assert not is_export(tmp_path / "exp")
    with pytest.raises(CheckpointError, match="is not a dmssl export"):
        export(run, tmp_path / "exp", overwrite=True)


def test_export_of_an_export_onto_its_run_folder_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, copy / "export")
    before = snapshot(copy)
    with pytest.raises(CheckpointError, match="holds the run folder"):
        export(copy / "export", copy, overwrite=True)
    shutil.move(copy / "export", tmp_path / "export")  # beside it: the run folder is still no export to replace
    with pytest.raises(CheckpointError, match="is not a dmssl export"):
        export(tmp_path / "export", copy, overwrite=True)
    shutil.move(tmp_path / "export", copy / "export")
    assert snapshot(copy) == before


def test_export_overwrite_replaces_an_earlier_export_and_a_kill_between_renames_loses_nothing(run, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "exp"
    export(run, out)
    assert export(run, out, overwrite=True) == out and is_export(out)
    old = snapshot(out)
    # The second rename (new export in) fails: the old export is put back.
    real_replace = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(CheckpointError, match="No space left"):
        export(run, out, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(out) == old and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A process killed right after setting the old export aside: the next export puts it back first.
    aside = tmp_path / f".exp.{dead_pid()}.old"
    os.replace(out, aside)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export(run, out)  # recovered, then refused without --overwrite: the old export is whole again
    assert snapshot(out) == old and not aside.exists()


def test_a_dead_writers_temporary_files_are_removed_and_a_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".step_00000002.pt.{dead}.abc.tmp").write_bytes(b"partial")
    (tmp_path / f".exp.{dead}.xyz.tmp").mkdir()
    (tmp_path / f".step_00000004.pt.{live}.def.tmp").write_bytes(b"being written")
    (tmp_path / "step_00000001.pt").write_bytes(b"not temporary")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".step_00000002.pt.{dead}.abc.tmp", f".exp.{dead}.xyz.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".step_00000004.pt.{live}.def.tmp", "step_00000001.pt"])


# ---------------------------------------------------------------- 3: corrupt checkpoints and pruning


def test_a_corrupt_newer_checkpoint_is_set_aside_and_never_counted(tmp_path):
    folder = tmp_path / "run"
    steps = [*Q, "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5", f"output_dir={folder}"]
    fit(resolve([*steps, "trainer.max_steps=4"]))
    (folder / "checkpoints" / "step_00000008.pt").write_bytes(b"\x80\x02 torn")
    with pytest.warns(UserWarning, match="step_00000008.pt.*moved to step_00000008.pt.corrupt"):
        summary = fit(resolve([*steps, "trainer.max_steps=6", "trainer.keep_checkpoints=1", "resume=auto"]))
    assert summary["steps"] == 6
    assert [p.name for p in list_checkpoints(folder / "checkpoints")] == ["step_00000006.pt"]
    assert (folder / "checkpoints" / "step_00000008.pt.corrupt").read_bytes() == b"\x80\x02 torn"  # kept to inspect
    assert dmssl.load(folder).source.endswith("(step 6)")


def test_pruning_sets_aside_an_unreadable_checkpoint_it_would_have_kept(tmp_path):
    from dmssl.checkpoint import prune_checkpoints, save_checkpoint

    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "model": {}}, folder / f"step_{step:08d}.pt")
    (folder / "step_00000002.pt").write_bytes((folder / "step_00000002.pt").read_bytes()[:-40])  # torn tail
    with pytest.warns(UserWarning, match="step_00000002.pt"):
        prune_checkpoints(folder, keep=2, newest=folder / "step_00000003.pt")
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000001.pt", "step_00000003.pt"]
    assert (folder / "step_00000002.pt.corrupt").is_file()


# ---------------------------------------------------------------- 4: predict never overwrites its input


def test_predict_refuses_an_output_that_is_an_input(run, tmp_path, capsys):
    table = tmp_path / "data.csv"
    table.write_text("text,label\nhello,0\n")
    before = table.read_bytes()
    assert console(["predict", str(run), str(table), "--output", str(table)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err and table.read_bytes() == before
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    assert console(["predict", str(run), str(tmp_path / "images"), "--output", str(tmp_path / "nowhere" / "p.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert console(["predict", str(run), str(tmp_path / "images"), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["input"].endswith("a.png")


# ---------------------------------------------------------------- 5: one process per run folder


def test_a_second_process_in_a_held_run_folder_stops_with_exit_2_naming_the_holder(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dmssl.run_dir import RunLock\n"
        f"with RunLock(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main([*Q, "trainer.max_steps=2", f"output_dir={folder}", "resume=auto"])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by process {holder.pid}" in err, err
        assert not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, lock file left behind): its lock is taken over
    assert "process" in (folder / RunLock.FILE).read_text()
    assert main([*Q, "trainer.max_steps=2", f"output_dir={folder}", "resume=auto"]) == 0


def test_the_lock_is_released_when_the_run_ends_or_fails(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder), pytest.raises(RunFolderBusy), RunLock(folder):
        pass
    with RunLock(folder):  # released by the exit above
        pass
    with pytest.raises(DataError), RunLock(folder):
        raise DataError("a failed run")
    with RunLock(folder):
        pass


# ---------------------------------------------------------------- 6: no code run from a shared folder


@pytest.fixture
def booby_trapped(run, tmp_path, monkeypatch):
    """A copy of the run whose config names a plugin that records being imported, on the import path."""
    marker = tmp_path / "imported"
    code = tmp_path / "code"
    code.mkdir()
    (code / "shipped_plugin.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    monkeypatch.syspath_prepend(str(code))
    folder = tmp_path / "shared-run"
    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["plugins"] = ["shipped_plugin"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    yield folder, marker
    sys.modules.pop("shipped_plugin", None)


def test_loading_a_folder_imports_none_of_its_plugins_unless_trusted(booby_trapped, tmp_path, capsys):
    folder, marker = booby_trapped
    with pytest.raises(UntrustedCode, match="'shipped_plugin'.*trust_plugins=True"):
        dmssl.load(folder)
    for command in (["predict", str(folder), str(folder / "x.png")], ["export", str(folder), str(tmp_path / "e")]):
        assert console(command) == 2
        assert "--trust-plugins" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "e").exists()
    assert dmssl.load(folder, trust_plugins=["shipped_plugin"]).num_classes == 10
    assert marker.read_text() == "ran"


def test_a_module_class_adapter_in_a_folder_is_not_imported_unless_trusted(run, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "shipped_adapter.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nfrom modalities.image import ImageModality as A\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    folder = tmp_path / "shared"
    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["modality"]["name"] = "shipped_adapter:A"
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        with pytest.raises(UntrustedCode, match="'shipped_adapter'"):
            dmssl.load(folder)
        assert not marker.exists()
        assert dmssl.load(folder, trust_plugins=True).num_classes == 10 and marker.exists()
    finally:
        sys.modules.pop("shipped_adapter", None)


def test_a_folder_on_the_import_path_with_python_files_is_refused(run, tmp_path, monkeypatch):
    export(run, tmp_path / "exp")
    (tmp_path / "exp" / "modalities.py").write_text("raise SystemExit('shadowed')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "exp"))
    with pytest.raises(UntrustedCode, match="import path.*modalities.py"):
        dmssl.load(tmp_path / "exp")


def test_the_model_card_loads_the_export_from_outside_it(run, tmp_path):
    export(run, tmp_path / "exp")
    card = (tmp_path / "exp" / "README.md").read_text()
    assert 'dmssl.load(".")' not in card and "from outside it" in card


# ---------------------------------------------------------------- 7: archives are unpacked safely


@pytest.mark.parametrize(("member", "message"), [("../escaped.txt", "outside"),
                                                 ("/tmp/dmssl-absolute-escape.txt", "not a Speech Commands v2 folder")])
def test_an_archive_member_outside_the_folder_is_never_written_there(tmp_path, member, message):
    # `..` is refused outright; an absolute name is made relative (tarfile's data filter), so it lands inside
    archive = tmp_path / "root" / "speech_commands_v0.02.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("yes/a.wav", member):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, BytesIO(b"RIFF"))
    from modalities.audio import load_speech_commands

    with pytest.raises(DataError, match=message):
        load_speech_commands(str(archive.parent), None, 16000, 16000)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/dmssl-absolute-escape.txt").exists()


def test_a_safe_archive_is_unpacked_whole(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("yes/a.wav")
        info.size = 4
        tar.addfile(info, BytesIO(b"RIFF"))
    extract_tar_safely(archive, tmp_path / "out")
    assert (tmp_path / "out" / "yes" / "a.wav").read_bytes() == b"RIFF"


# ---------------------------------------------------------------- 8: caches follow their data


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_image_cache_follows_every_file_and_a_corrupt_cache_is_rebuilt(tmp_path):
    from modalities.image import load_image_folder

    root, cache = tmp_path / "images", tmp_path / "cache"
    for split in ("train", "test"):
        for label, value in (("cat", 10), ("dog", 200)):
            write_png(root / split / label / "0.png", value)
    first = load_image_folder(root, None, str(cache))
    key = tree_identity(root)
    write_png(root / "train" / "cat" / "0.png", 99)  # replace one image's pixels
    os.utime(root / "train" / "cat" / "0.png", ns=(1, 1))
    assert tree_identity(root) != key
    second = load_image_folder(root, None, str(cache))
    assert int(first.train[0][0, 0, 0]) == 10 and int(second.train[0][0, 0, 0]) == 99
    write_png(root / "train" / "eel" / "0.png", 50)  # a new class folder
    assert load_image_folder(root, None, str(cache)).class_names == ["cat", "dog", "eel"]
    for stored in cache.glob("images-*.npz"):
        stored.write_bytes(stored.read_bytes()[: len(stored.read_bytes()) // 2])  # torn
    with pytest.warns(UserWarning, match="is corrupt.*rebuilding it"):
        rebuilt = load_image_folder(root, None, str(cache))
    assert rebuilt.class_names == ["cat", "dog", "eel"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache reads cleanly
        assert load_image_folder(root, None, str(cache)).class_names == ["cat", "dog", "eel"]


# ---------------------------------------------------------------- 9, 10: settings that would be silently wrong


def test_resume_from_a_path_with_other_settings_is_refused(run, tmp_path):
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match=r"trainer.lr: 0.03 -> 0.5"):
        fit(resolve([*Q, "trainer.max_steps=6", "trainer.lr=0.5", f"resume={checkpoint}", f"output_dir={tmp_path}"]))
    summary = fit(resolve([*Q, "trainer.max_steps=6", f"resume={checkpoint}", f"output_dir={tmp_path / 'ok'}"]))
    assert summary["steps"] == 6


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.cosine_cycles=2", "trainer.cosine_cycles=2.0 must be in (0, 0.5]"),
    ("trainer.momentum=0", "trainer.momentum=0.0 must be >= 0, and > 0 with trainer.nesterov=true"),
    ("model.depth=16", "model.depth=16 is not used by model.encoder='small_cnn'"),
    ("distance.bandwidths=[]", "distance.bandwidths=[] must be null"),
    ("seed=18446744073709551617", "seed=18446744073709551617 must be in [0, 2**32)"),
    ("plugins=[.foo]", "plugins: '.foo' is not a Python module name"),
    ("modality.name=:", "modality.name=':' is not package.module:ClassName"),
])
def test_values_a_library_would_refuse_are_refused_with_the_value(override, message, tmp_path):
    with pytest.raises(ConfigError) as caught:
        fit(resolve([*Q, override, f"output_dir={tmp_path}"]))
    assert message in str(caught.value)


def test_lr_schedule_never_goes_negative_at_the_largest_cycles_allowed():
    from dmssl.config import TrainerConfig
    from dmssl.trainer import learning_rate

    cfg = TrainerConfig(max_steps=100, cosine_cycles=0.5)
    assert min(learning_rate(s, cfg) for s in range(101)) >= -1e-12


def test_classifier_refuses_nan_one_unbatched_image_strings_and_empty_images(run):
    clf = dmssl.load(run)
    with pytest.raises(DataError, match="NaN or infinite"):
        clf.predict(np.full((2, 8, 8), np.nan))
    with pytest.raises(DataError, match=r"looks like one \(H, W, C\) image"):
        clf.predict(np.zeros((32, 32, 3), dtype=np.uint8))
    assert clf.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8)).shape == (1,)
    with pytest.raises(DataError, match="numeric array"):
        clf.predict(["a string"])
    with pytest.raises(DataError, match="empty"):
        clf.predict(np.zeros((1, 0, 8), dtype=np.uint8))


def test_labeled_groups_that_leave_a_class_without_labels_stop_the_run(tmp_path):
    from dmssl.data import RawData
    from dmssl.trainer import split_run_data

    raw = RawData(train=list(range(8)), train_labels=[0, 1, 2, 0, 1, 2, 0, 1], test=[0, 1], test_labels=[0, 1],
                  class_names=["a", "b", "c"], train_groups=["x", "x", "y", "y", "x", "y", "x", "x"],
                  test_groups=["y", "y"])
    cfg = resolve([*Q, "data.labels_per_class=null", "data.num_labels=null", "data.labeled_groups=[x]",
                   "data.target_groups=[y]", f"output_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"leaves classes without a labeled sample: \['c'\]"):
        split_run_data(raw, cfg)


def test_hf_float_labels_and_validation_files(tmp_path):
    import datasets

    from dmssl.config import DataConfig
    from dmssl.hf_data import hf_columns, load_hf_splits

    root = tmp_path / "tables"
    root.mkdir()
    rows = {"text": ["a", "b", "c"], "label": [0.0, 1.0, 1.0]}
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "train-0.parquet"))
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "test-0.parquet"))
    datasets.Dataset.from_dict({"text": ["v"], "label": [1.0]}).to_parquet(str(root / "validation-0.parquet"))
    data = DataConfig(dataset="hf", root=str(root))
    with pytest.warns(UserWarning, match="left out 1 file.*validation-0.parquet"):
        splits = load_hf_splits(data)
    assert sorted(splits) == ["test", "train"] and len(splits["train"]) == 3  # validation not merged into train
    with pytest.warns(UserWarning):
        assert hf_columns(data, "text", "label").train_labels == [0, 1, 1]  # whole-number floats are fine
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0.0, 1.7]}).to_parquet(str(root / "train-0.parquet"))
    with pytest.raises(DataError, match="label 1.7"), pytest.warns(UserWarning):
        hf_columns(data, "text", "label")


def test_model_description_and_config_that_are_broken_name_the_file(run, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(run, folder)
    (folder / "model.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="model.json cannot be read as JSON"):
        dmssl.load(folder)
    (folder / "model.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="model.json does not hold a JSON object"):
        dmssl.load(folder)
    (folder / "config.yaml").write_text("- a\n- list\n")
    with pytest.raises(CheckpointError, match="config.yaml.*not a mapping"):
        dmssl.load(folder)
    (folder / "config.yaml").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match="config.yaml is not valid YAML text"):
        dmssl.load(folder)


def test_checkpoints_remain_loadable_after_all_of_this(run):
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ema_entries_equal_to_the_models_are_stored_once_and_old_checkpoints_still_read():
    from dmssl.checkpoint import ema_weights, without_copies
    from dmssl.errors import CheckpointError

    model = {"frozen": torch.ones(3), "trained": torch.zeros(2), "half": torch.ones(3, dtype=torch.float16)}
    ema = {"frozen": torch.ones(3), "trained": torch.full((2,), 0.5), "half": torch.ones(3)}  # dtype differs: kept
    kept, shared = without_copies(ema, model)
    assert shared == ["frozen"] and set(kept) == {"trained", "half"}
    state = {"model": model, "ema": {"module": kept, "same_as_model": shared, "updates": 3}}
    full = ema_weights(state)
    assert set(full) == set(ema) and all(torch.equal(full[k], ema[k]) for k in ema)
    old = {"model": model, "ema": {"module": ema, "updates": 3}}  # written before entries were shared
    assert ema_weights(old) is not ema and all(torch.equal(ema_weights(old)[k], ema[k]) for k in ema)
    with pytest.raises(CheckpointError, match="does not hold"):
        ema_weights({"model": {}, "ema": {"module": kept, "same_as_model": shared}})
