"""Using a trained model: metrics, dmssl.load / Classifier, dmssl predict, dmssl export, dmssl.fit, the console command.

The model is a short quickstart run (scikit-learn's digits, real data that installs with scikit-learn).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmssl
from dmssl.metrics import ClassificationReport, confusion_matrix
from modalities.image import load_digits
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- metrics


def test_metrics__match_scikit_learn_on_random_predictions():
    from sklearn.metrics import f1_score, recall_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, 300))
    report = ClassificationReport(confusion_matrix(torch.from_numpy(labels), torch.from_numpy(predictions), 5))
    assert report.total == 300
    assert report.accuracy == pytest.approx((labels == predictions).mean())
    assert report.macro_f1 == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert report.per_class_accuracy == pytest.approx(list(recall_score(labels, predictions, average=None)))


def test_metrics__a_class_absent_from_the_split_has_no_accuracy_and_no_f1():
    from sklearn.metrics import f1_score

    labels, predictions = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    report = ClassificationReport(confusion_matrix(labels, predictions, 3))  # class 2 occurs nowhere
    assert np.isnan(report.per_class_accuracy[2]) and report.per_class_accuracy[:2] == [0.5, 1.0]
    assert report.macro_f1 == pytest.approx(f1_score(labels, predictions, average="macro", labels=[0, 1]))


# ---------------------------------------------------------------- a trained quickstart model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    # fp32 pinned: a test below predicts the test set exactly as the run's evaluation did, and a Classifier
    # computes in fp32, where a bf16 evaluation (auto may pick it) rounds differently.
    run = dmssl.fit("quickstart", trainer__max_steps=40, trainer__eval_every=20, trainer__progress_bar=False,
                    data__num_workers=0, data__dev_size=100, trainer__mixed_precision="no", output_dir=str(out))
    assert isinstance(run, dmssl.Run) and run.run_dir == out
    return out


def test_fit__returns_the_run_with_its_summary_and_the_new_metrics(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    run = dmssl.Run.from_dir(run_dir)
    assert run.test_accuracy == summary["test_accuracy"] and run.config.trainer.max_steps == 40
    assert summary["class_names"] == [str(d) for d in range(10)]
    assert 0 < summary["test_macro_f1"] <= 1 and len(summary["test_per_class_accuracy"]) == 10
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_macro_f1"] == summary["test_macro_f1"] and "dev_macro_f1" in last
    confusion = json.loads((run_dir / "confusion_matrix.json").read_text())
    matrix = np.array(confusion["matrix"])
    assert matrix.sum() == summary["num_test_evaluated"] == 500
    assert np.trace(matrix) / matrix.sum() == pytest.approx(summary["test_accuracy"])


def test_fit__a_misspelt_keyword_is_the_command_lines_error():
    with pytest.raises(dmssl.ConfigError, match="did you mean 'trainer.max_steps'"):
        dmssl.fit("quickstart", trainer__max_step=3)


def test_load__predicts_the_test_set_exactly_as_the_evaluation_did(run_dir):
    clf = dmssl.load(run_dir)
    raw = load_digits(seed=0)  # the quickstart's data; the run evaluated all 500 test digits
    predicted = clf.predict(raw.test)
    confusion = np.array(json.loads((run_dir / "confusion_matrix.json").read_text())["matrix"])
    rebuilt = np.zeros_like(confusion)
    np.add.at(rebuilt, (np.array(raw.test_labels), predicted), 1)
    assert (rebuilt == confusion).all()
    proba = clf.predict_proba(raw.test[:7])
    assert proba.shape == (7, 10) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == predicted[:7]).all()
    z = clf.embed(raw.test[:3])
    assert z.shape == (3, 128) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert clf.embed(raw.test[:3], space="features").shape[0] == 3
    # Float arrays in [0, 1] and (H, W) arrays are the same images as uint8 (C, H, W) tensors.
    floats = [img[0].numpy() / 255.0 for img in raw.test[:5]]
    assert (clf.predict(floats) == predicted[:5]).all()


@pytest.fixture(scope="module")
def png_digits(tmp_path_factory, run_dir):
    folder = tmp_path_factory.mktemp("pngs")
    raw = load_digits(seed=0)
    for i in range(6):
        Image.fromarray(raw.test[i][0].numpy()).save(folder / f"digit_{i}.png")
    return folder, raw.test[:6]


def test_predict_command__same_classes_as_the_python_api_for_png_files(run_dir, png_digits, tmp_path):
    folder, images = png_digits
    expected = [str(k) for k in dmssl.load(run_dir).predict(images)]
    out = tmp_path / "preds.jsonl"
    done = subprocess.run([sys.executable, "-m", "dmssl", "predict", str(run_dir), str(folder), "--output", str(out),
                           "--top-k", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["input"]).name for r in rows] == [f"digit_{i}.png" for i in range(6)]
    assert [r["prediction"] for r in rows] == expected
    for r in rows:
        probs = [p for _, p in r["top_k"]]
        assert len(r["top_k"]) == 3 and probs == sorted(probs, reverse=True) and r["probability"] == probs[0]
    csv = subprocess.run([sys.executable, "-m", "dmssl.predict", str(run_dir), str(folder / "digit_0.png")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert csv.returncode == 0 and csv.stdout.splitlines()[1].split(",")[1] == expected[0]


def test_console_command__is_installed_and_works_from_any_folder(run_dir, png_digits, tmp_path):
    command = shutil.which("dmssl", path=str(Path(sys.executable).parent))
    assert command, "the dmssl entry point is not installed beside this Python (pip install -e .)"
    folder, images = png_digits
    done = subprocess.run([command, "predict", str(run_dir), str(folder / "digit_1.png")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split(",")[1] == str(dmssl.load(run_dir).predict(images[1:2])[0])
    helped = subprocess.run([command, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert all(name in helped.stdout for name in ("train", "predict", "export", "plot"))
    # recipes are found from another working folder: a bad override stops after the recipe was read
    wrong = subprocess.run([command, "train", "recipe=quickstart", "trainer.max_step=3"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert wrong.returncode == 2 and "did you mean 'trainer.max_steps'" in wrong.stderr


def test_recipes_ship_inside_the_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"]["dmssl.recipes"] == "recipes" and "dmssl.recipes" in setuptools["packages"]
    assert setuptools["package-data"]["dmssl.recipes"] == ["*.yaml"]
    assert project["project"]["scripts"]["dmssl"] == "dmssl.cli:console"


def test_export__reloads_to_the_same_probabilities_with_a_model_card(run_dir, tmp_path):
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "dmssl", "export", str(run_dir), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "model.json", "README.md"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['test_accuracy']:.4f}" in (out / "README.md").read_text()
    images = load_digits(seed=0).test[:20]
    assert np.allclose(dmssl.load(out).predict_proba(images), dmssl.load(run_dir).predict_proba(images), atol=1e-6)
    # the export is self-contained: the run folder can go
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    assert dmssl.load(moved).class_names == [str(d) for d in range(10)]


def test_plot__writes_the_confusion_matrix_figure(run_dir):
    done = subprocess.run([sys.executable, "-m", "dmssl", "plot", str(run_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "plots" / "confusion.png").stat().st_size > 1000


def test_load__a_run_folder_written_before_model_json_reads_its_data_once(run_dir, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    (old / "model.json").unlink()
    images = load_digits(seed=0).test[:10]
    clf = dmssl.load(old)
    assert clf.class_names == [str(d) for d in range(10)]
    assert (clf.predict(images) == dmssl.load(run_dir).predict(images)).all()
