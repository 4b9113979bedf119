"""The run folder on its own: what makes a run itself, refusing to mix runs, JSON-line logs, checkpoints."""

import json

import pytest
import torch
import yaml
from torch import nn

from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.errors import CheckpointError
from dmssl.recipe import resolve
from dmssl.run_dir import (
    append_json_line,
    check_run_dir,
    code_version,
    keep_metric_lines_up_to,
    run_identity,
    save_train_state,
    write_run_dir,
)
from dmssl.train_state import TrainState
from dmssl.trainer import EMA


def cfg_for(tmp_path, *extra):
    return resolve(["recipe=quickstart", f"output_dir={tmp_path}", *extra])


def test_run_identity__leaves_out_what_may_change_on_resume(tmp_path):
    a = run_identity(cfg_for(tmp_path, "trainer.max_steps=10", "trainer.eval_every=5"))
    b = run_identity(cfg_for(tmp_path, "trainer.max_steps=99", "trainer.eval_every=7"))
    assert a == b and "trainer.max_steps" not in a
    assert a != run_identity(cfg_for(tmp_path, "objective.lambda_dm=3"))


def test_check_run_dir__fresh_same_and_different_runs(tmp_path):
    cfg = cfg_for(tmp_path)
    assert check_run_dir(cfg) == tmp_path  # empty folder: fine
    write_run_dir(cfg, tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["recipe"] == "quickstart"
    # a run that stopped before training (bad data, say) leaves only config.yaml: the corrected rerun goes ahead
    assert check_run_dir(cfg_for(tmp_path, "objective.lambda_dm=2")) == tmp_path
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match="already holds a run"):
        check_run_dir(cfg)
    assert check_run_dir(cfg_for(tmp_path, "resume=auto", "trainer.max_steps=5")) == tmp_path
    with pytest.raises(CheckpointError, match="holds a different run .*objective.lambda_dm"):
        check_run_dir(cfg_for(tmp_path, "resume=auto", "objective.lambda_dm=2"))
    (tmp_path / "config.yaml").write_text("{unclosed")
    with pytest.raises(CheckpointError, match="is not valid YAML"):
        check_run_dir(cfg_for(tmp_path, "resume=auto"))


def test_write_run_dir__overwrite_clears_the_old_results(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001.pt").write_bytes(b"x")
    (tmp_path / "summary.json").write_text("{}")
    write_run_dir(cfg_for(tmp_path, "overwrite=true"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()


def test_json_lines__append_and_cut_back_to_a_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    for step in (5, 10, 15):
        append_json_line(log, {"step": step, "test_accuracy": step / 100})
    keep_metric_lines_up_to(log, 10)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [5, 10]
    with pytest.raises(ValueError):
        append_json_line(log, {"step": 1, "loss": float("nan")})  # NaN is not JSON


def test_save_train_state__names_by_step_and_keeps_the_newest(tmp_path):
    cfg = cfg_for(tmp_path, "trainer.keep_checkpoints=2")
    model = nn.Linear(2, 2)
    state = TrainState(model, EMA(model, 0.9), torch.optim.SGD(model.parameters(), lr=0.1), nn.Module(), [0])
    for step in (1, 2, 3):
        state.step = step
        save_train_state(state, tmp_path / "checkpoints", cfg)
    files = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in files] == ["step_00000002.pt", "step_00000003.pt"]
    assert load_checkpoint(files[-1])["step"] == 3


def test_code_version__the_checkouts_commit_or_the_package_version_without_git(monkeypatch):
    import subprocess

    import dmssl
    from dmssl import run_dir

    checkout = run_dir.Path(run_dir.__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert code_version().split("+")[0] == head
    else:
        assert code_version() == dmssl.__version__

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_dir.subprocess, "run", no_git)
    assert code_version() == dmssl.__version__
