"""A new distance or objective is one class in one file: tests/toy_methods.py, run from the command line."""

import json
import subprocess
import sys

import pytest
import yaml

from dmssl.errors import ConfigError
from dmssl.recipe import resolve
from tests.conftest import ROOT

FAST = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "data.batch_size=8", "data.mu=2",
        "trainer.max_steps=3", "trainer.save_embeddings=false", "plugins=[tests.toy_methods]"]


@pytest.mark.slow
def test_toy_distance_and_objective_run_from_the_command_line_with_their_options(tmp_path):
    for name, extra in [("distance", ["distance.name=toy", "distance.scale=2.5"]),
                        ("objective", ["objective.name=toy_smoothed", "objective.smoothing=0.2"])]:
        done = subprocess.run([sys.executable, "train.py", *FAST, *extra, f"output_dir={tmp_path / name}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        if name == "distance":
            assert summary["distance"] == "toy" and saved["distance"] == {"name": "toy", "scale": 2.5}
            metrics = [json.loads(line) for line in (tmp_path / name / "train.jsonl").read_text().splitlines()]
            assert all(m["distance"] >= 0 for m in metrics)
        else:
            assert summary["objective"] == "toy_smoothed" and summary["distance"] is None
            assert saved["objective"] == {"name": "toy_smoothed", "temperature": 0.1, "smoothing": 0.2}


def test_toy_options_are_typed_checked_and_listed_in_the_reference():
    cfg = resolve([*FAST, "distance.name=toy", "distance.scale=3"])
    assert cfg.distance.options.scale == 3.0
    with pytest.raises(ConfigError, match="distance.scale='big' is not a float"):
        resolve([*FAST, "distance.name=toy", "distance.scale=big"])
    with pytest.raises(ConfigError, match="did you mean 'distance.scale'"):
        resolve([*FAST, "distance.name=toy", "distance.scael=3"])
    from dmssl.reference import generate

    page = generate()
    assert "### `distance.name: toy` (tests.toy_methods.ToyDistance)" in page
    assert "| `distance.scale` | float | `1.0` | multiplies the squared distance between the two means |" in page
    assert "| `objective.smoothing` | float | `0.1` | label smoothing of the labeled cross-entropy |" in page


def test_a_plugin_that_does_not_import_is_named():
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin'"):
        resolve(["recipe=quickstart", "plugins=[no_such_plugin]"])
