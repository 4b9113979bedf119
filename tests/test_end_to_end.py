"""Short real runs on scikit-learn's digits: files written, budgets, resume after SIGKILL."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.recipe import resolve
from dmssl.trainer import fit
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
FAST = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "data.batch_size=8", "data.mu=2"]


def run(tmp_path: Path, *overrides: str) -> dict:
    return fit(resolve([*FAST, f"output_dir={tmp_path}", *overrides]))


@pytest.mark.parametrize("objective", ["supervised", "fixmatch", "sscl", "dmssl"])
def test_fit__writes_run_folder(tmp_path, objective):
    summary = run(tmp_path, f"objective.name={objective}", "trainer.max_steps=12", "trainer.eval_every=5")
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["steps"] == 12 and summary["objective"] == objective
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 12]
    if objective != "supervised":
        assert "mask_rate" in records[-1] and "pseudo_label_accuracy" in records[-1]
    if objective == "dmssl":
        assert "distance" in records[-1]
    assert (tmp_path / "config.yaml").is_file()


def test_fit__max_minutes_stops_early(tmp_path):
    summary = run(tmp_path, "trainer.max_steps=100000", "trainer.max_minutes=0.05")
    assert summary["stop_reason"] == "max_minutes" and 0 < summary["steps"] < 100000


def test_fit__refuses_output_dir_of_another_run(tmp_path):
    run(tmp_path, "trainer.max_steps=2")
    from dmssl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="already holds a run"):
        run(tmp_path, "trainer.max_steps=2")
    with pytest.raises(CheckpointError, match="holds a different run.*objective.lambda_dm"):
        run(tmp_path, "trainer.max_steps=2", "objective.lambda_dm=3", "resume=auto")
    assert run(tmp_path, "trainer.max_steps=2", "overwrite=true")["steps"] == 2


def test_fit__dmssl_learns_digits(tmp_path):
    # A real (short) run must beat chance (10 classes) by a wide margin.
    summary = run(tmp_path, "trainer.max_steps=150", "data.batch_size=16")
    assert summary["test_accuracy"] > 0.5


def final_weights(folder: Path) -> dict:
    return load_checkpoint(list_checkpoints(folder / "checkpoints")[-1])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume__sigkill_midway_then_resume_equals_uninterrupted(tmp_path, precision):
    # Distribution alignment on: its running mean of predictions must survive the restart too.
    # Precision pinned: the straight and the killed run are two runs, and with auto each would time its own
    # first step and might choose differently on a loaded machine. That a resumed run keeps auto's choice is
    # tested in tests/test_precision.py.
    args = [sys.executable, "train.py", *FAST, "trainer.max_steps=40", "trainer.checkpoint_every=4",
            "trainer.eval_every=8", "trainer.keep_checkpoints=3", "pseudo_label.distribution_alignment=true",
            "pseudo_label.alignment_momentum=0.9", f"trainer.mixed_precision={precision}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*args, f"output_dir={straight}"], cwd=ROOT, check=True, capture_output=True, timeout=600)

    process = subprocess.Popen([*args, f"output_dir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(int(p.stem.split("_")[1]) >= 12 for p in list_checkpoints(killed / "checkpoints")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    steps_done = max(int(p.stem.split("_")[1]) for p in list_checkpoints(killed / "checkpoints"))
    assert steps_done < 40, "the run finished before it could be killed; make it longer"

    subprocess.run([*args, f"output_dir={killed}", "resume=auto"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    a, b = final_weights(straight), final_weights(killed)
    assert a["step"] == b["step"] == 40
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][key], b["ema"]["module"][key]), key
    assert torch.equal(a["objective"]["pseudo_labeller.prediction_mean"], b["objective"]["pseudo_labeller.prediction_mean"])
    assert json.loads((straight / "summary.json").read_text())["test_accuracy"] == \
        json.loads((killed / "summary.json").read_text())["test_accuracy"]
    assert (straight / "metrics.jsonl").read_text().count("\n") == (killed / "metrics.jsonl").read_text().count("\n")


def test_resume__corrupt_newest_checkpoint_falls_back(tmp_path):
    run(tmp_path, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="cannot be read"):
        summary = run(tmp_path, "trainer.max_steps=8", "trainer.checkpoint_every=4", "resume=auto")
    assert summary["resumed_from"].endswith("step_00000004.pt")
    assert summary["steps"] == 8


def run_or_dump_stacks(command: list[str], timeout: float, marker: str) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; if it hangs, fail with every process's Python stacks.

    SIGABRT makes faulthandler (PYTHONFAULTHANDLER=1) print each process's threads before it dies,
    so a rare hang reports where it waited instead of only that it timed out. The signal goes to every
    process whose command line holds `marker` (e.g. the run's output_dir) as well as to the group: a
    worker that outlives torchrun can sit in a group of its own and still hold the output pipes open.
    """
    import psutil

    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)

    def signal_all(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for other in psutil.process_iter(["cmdline"]):
            if marker in " ".join(other.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    other.send_signal(sig)

    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_all(signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            signal_all(signal.SIGKILL)
            _, stderr = process.communicate(timeout=30)
        pytest.fail(f"{' '.join(command[1:6])} ... did not finish in {timeout:.0f} s; stacks and stderr: {stderr[-8000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_processes_with_torchrun(tmp_path):
    # Two CPU processes (gloo): one run folder, written once, every test sample counted once.
    # --standalone lets the rendezvous bind a free port itself: a port chosen here could be taken
    # before torchrun binds it, and then the rendezvous waits instead of failing.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *FAST, "trainer.max_steps=6", "trainer.eval_every=3", f"output_dir={tmp_path}"]
    result = run_or_dump_stacks(command, timeout=300, marker=f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 6
    assert summary["num_test_evaluated"] == summary["num_test"] == 500
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    assert result.stdout.count("test_accuracy=") == 1  # printed by the main process only


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    args = [sys.executable, "train.py", *FAST, "trainer.max_steps=400", "trainer.checkpoint_every=1000",
            f"output_dir={tmp_path}"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Wait until the loop runs (its first log line), so the signal reaches the loop's handler.
    while time.time() < deadline and not (tmp_path / "train.jsonl").is_file():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-1000:]
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and 0 < load_checkpoint(saved[0])["step"] < 400
    result = subprocess.run([*args, "resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and json.loads((tmp_path / "summary.json").read_text())["steps"] == 400


def test_sigterm_to_the_process_group_with_workers_stops_cleanly(tmp_path):
    # A scheduler signals the whole group: the DataLoader workers too. They leave it to the main process,
    # which saves a checkpoint and exits 130 without any worker's traceback.
    args = [sys.executable, "train.py", *[a for a in FAST if not a.startswith("data.num_workers")], "data.num_workers=2",
            "trainer.max_steps=400", "trainer.checkpoint_every=1000", "trainer.mixed_precision=no", f"output_dir={tmp_path}"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "train.jsonl").is_file():
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 1


class _NaNAfterThreeSteps(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.feature_dim, self.calls = inner, inner.feature_dim, 0

    def forward(self, rows):
        if self.training:
            self.calls += 1
        out = self.inner(rows)
        return out * float("nan") if self.calls > 3 else out


from examples.tabular import TabularModality  # noqa: E402


class NaNTabular(TabularModality):
    """The tutorial's adapter with an encoder that returns NaN from the 4th training step on."""

    def build_encoder(self):
        return _NaNAfterThreeSteps(super().build_encoder())


def test_nan_loss_stops_with_step_and_terms_and_keeps_last_checkpoint(tmp_path, capsys):
    from dmssl.cli import main

    code = main([f"recipe={ROOT / 'examples' / 'tabular.yaml'}", "modality.name=tests.test_end_to_end:NaNTabular",
                 "trainer.checkpoint_every=1", "trainer.progress_bar=false", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 3
    assert "loss is nan at step 3" in err and "loss_contrastive" in err
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = load_checkpoint(newest)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_plot__renders_figures_of_a_run(tmp_path):
    from dmssl.plot import compare, plot_run

    run(tmp_path / "a", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=2")
    written = plot_run(tmp_path / "a")
    assert {p.name for p in written} == {"curves.png", "distance.png", "embeddings.png", "confusion.png"}
    assert all(p.stat().st_size > 10_000 for p in written)  # real images, not empty files
    run(tmp_path / "b", "trainer.max_steps=6", "objective.name=sscl")
    assert compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp.png").stat().st_size > 10_000


def test_tensorboard_tracker_receives_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard comes with the [dev] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=2", "trainer.log_with=tensorboard")
    events = EventAccumulator(str(tmp_path / tmp_path.name))
    events.Reload()
    assert {"train/loss", "train/distance", "train/mask_rate", "eval/test_accuracy"} <= set(events.Tags()["scalars"])
