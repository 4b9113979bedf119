"""The benchmark scripts' report plumbing (their timings are not tested: they are measurements)."""

import json
import re

import pytest

from benchmarks.quality import render
from benchmarks.speed import peak_memory, write_section


def test_write_section__replaces_only_between_markers(tmp_path):
    page = tmp_path / "r.md"
    page.write_text("head\n<!-- speed:start -->\nold\n<!-- speed:end -->\ntail\n")
    write_section(page, "speed", "new table\n")
    assert page.read_text() == "head\n<!-- speed:start -->\nnew table\n<!-- speed:end -->\ntail\n"


def test_quality_render__mean_std_and_an_honest_verdict():
    rows = [{"objective": "supervised", "distance": None, "accuracies": [0.80, 0.82, 0.84], "steps": [10, 10, 10]},
            {"objective": "dmssl", "distance": "mmd", "accuracies": [0.70, 0.72, 0.74], "steps": [10, 10, 10]}]
    text = render({"rows": rows, "seeds": [0, 1, 2], "steps": 10, "minutes": None, "date": "d", "machine": "m",
                   "command": "c"})
    assert "| supervised | - | 82.00 +- 2.00 |" in text
    assert "does **not** beat the best baseline (supervised)" in text


def test_peak_memory__sees_a_large_allocation():
    import torch

    assert peak_memory(lambda: torch.ones(1024, 1024).sum()) >= 4 * 1024 * 1024


def test_loader_vs_step__times_the_build_in_one_thread_and_restores_the_thread_count(monkeypatch):
    import torch

    import benchmarks.speed as speed

    seen = []
    real_median_time = speed.median_time

    def recording_median_time(fn, repeats, warmup=2):
        seen.append(torch.get_num_threads())
        return real_median_time(fn, 1, warmup=0)

    monkeypatch.setattr(speed, "median_time", recording_median_time)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = speed.loader_vs_step(["recipe=quickstart", "data.batch_size=4", "data.mu=2"], repeats=1)
        assert seen[0] == 1  # the build, as a DataLoader worker runs it
        assert seen[1] == 2 and torch.get_num_threads() == 2  # the step, with the process's threads
    finally:
        torch.set_num_threads(before)
    assert report["build_s"] > 0 and report["workers_needed"] == report["build_s"] / report["step_s"]


def test_parse_cell__accepts_grid_cells_and_names_the_allowed_ones():
    import argparse

    import pytest

    from benchmarks.quality import parse_cell

    assert parse_cell("sscl") == ("sscl", None)
    assert parse_cell("dmssl:wasserstein") == ("dmssl", "wasserstein")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown cell 'dmssl:l2'.*dmssl:mmd"):
        parse_cell("dmssl:l2")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown cell 'dmssl'"):
        parse_cell("dmssl")  # dmssl needs its distance


def test_finished_with_same_config__reuses_only_a_run_with_the_cells_config(tmp_path):
    import yaml

    from benchmarks.quality import finished_with_same_config
    from dmssl.config import config_to_dict
    from dmssl.recipe import resolve

    overrides = ["recipe=quickstart", "objective.name=sscl", "trainer.max_steps=300", f"output_dir={tmp_path}"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(resolve(overrides)), sort_keys=False))
    assert not finished_with_same_config(tmp_path, overrides)  # not finished: no summary.json
    (tmp_path / "summary.json").write_text('{"test_accuracy": 0.5, "steps": 300}')
    assert finished_with_same_config(tmp_path, overrides)
    assert not finished_with_same_config(tmp_path, overrides[:-2] + ["trainer.max_steps=600", overrides[-1]])
    assert not finished_with_same_config(tmp_path, overrides + ["objective.unconfident_weight=0.5"])
    # A run saved before a key joined the schema is reused while the cell leaves that key at its default.
    saved = config_to_dict(resolve(overrides))
    del saved["data"]["hub_name"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert finished_with_same_config(tmp_path, overrides)
    assert not finished_with_same_config(tmp_path, overrides + ["data.hub_name=cifar10"])


def test_describe_runs_machine__reads_the_runs_not_the_rendering_process():
    from benchmarks.quality import describe_runs_machine

    assert describe_runs_machine([{"device": "cpu", "cpu_threads": 1}] * 3) == "CPU, 1 thread(s) per run"
    assert describe_runs_machine([{"device": "cpu", "cpu_threads": 1}, {"device": "cpu", "cpu_threads": 2}]) == \
        "CPU, 1-2 thread(s) per run"
    assert "cuda:0" in describe_runs_machine([{"device": "cuda:0", "cpu_threads": 16}])
    assert describe_runs_machine([{"device": "cpu"}]).startswith("CPU, ")


@pytest.mark.slow
def test_gpu_check_tiny__runs_every_part_and_renders(tmp_path, tiny_timm):
    """The GPU evidence script's CPU smoke run, as CI runs it: every part measured, JSON and markdown agree."""
    import json
    import subprocess
    import sys

    from benchmarks.gpu_check import render
    from tests.conftest import ROOT

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--pretrained", str(tiny_timm),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    tuned = report["fine_tune"]
    assert tuned["steps"] == 10 and 0 <= tuned["test_accuracy"] <= 1 and tuned["train_flops_per_image"] > 0
    assert "**Fine-tuning the pretrained encoder**" in render(report)
    assert {(r["objective"], r["variant"]) for r in report["speed"]} >= {("fixmatch", "fp32"), ("dmssl", "bf16+cl")}
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in report["speed"])
    assert {r["distance"] for r in report["distances"]} == {"cosine", "mmd", "wasserstein-sliced", "wasserstein-sinkhorn"}
    assert [r["objective"] for r in report["quality"]] == ["fixmatch", "dmssl"]
    assert all(r["steps"] == 10 and 0 <= r["data_wait_share"] <= 1 for r in report["quality"])
    page = tmp_path / "page.md"
    page.write_text("<!-- gpu-check:start -->\n<!-- gpu-check:end -->\n")
    subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--render", str(out), "--write", str(page)], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    assert render(report) in page.read_text()


@pytest.mark.slow
def test_gpu_check_only_fine_tune__runs_part_4_alone_with_a_curve_at_each_quarter_for_the_steps_and_seed_set(
        tmp_path, tiny_timm):
    import json
    import subprocess
    import sys

    from benchmarks.gpu_check import render
    from tests.conftest import ROOT

    out = tmp_path / "fine-tune.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--pretrained", str(tiny_timm),
                           "--only-fine-tune", "--steps", "8", "--set", "seed=3", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "speed" not in report and "quality" not in report
    tuned = report["fine_tune"]
    assert tuned["planned_steps"] == tuned["steps"] == 8 and tuned["timed_step_s"] > 0
    assert tuned["seed"] == 3
    assert [c["step"] for c in tuned["curve"]] == [2, 4, 6, 8]  # every quarter (8 // 4 = 2 steps)
    assert tuned["curve"][-1]["test_accuracy"] == tuned["test_accuracy"]
    assert "Test accuracy along the run" in render(report) and "**Step speed**" not in render(report)
    page = tmp_path / "page.md"
    page.write_text("<!-- gpu-fine-tune:start -->\n<!-- gpu-fine-tune:end -->\n")
    subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--render", str(out), "--write", str(page),
                    "--section", "gpu-fine-tune"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert render(report) in page.read_text()


@pytest.mark.parametrize("option", [["--only-fine-tune"], ["--steps", "100"], ["--set", "seed=1"]])
def test_gpu_check_fine_tune_options_without_a_model_are_refused(option):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", *option], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "need --pretrained PATH" in done.stderr


@pytest.mark.parametrize("options, named", [(["--steps", "0"], "--steps must be a positive"),
                                            (["--set", "objective.nme=fixmatch"], "objective.nme")])
def test_gpu_check__a_bad_step_count_or_override_stops_it_with_one_line(tmp_path, tiny_timm, options, named):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--pretrained", str(tiny_timm),
                           "--only-fine-tune", *options, "--json", str(tmp_path / "gpu.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and named in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_check_planned_steps__fill_the_budget_after_the_overhead():
    from benchmarks.gpu_check import FINE_TUNE_OVERHEAD_S, planned_steps

    assert planned_steps(FINE_TUNE_OVERHEAD_S + 125.0, 0.1) == 1000  # 125 s of steps at 1.25 x 0.1 s
    assert planned_steps(FINE_TUNE_OVERHEAD_S + 250.0, 0.1) == 2000
    assert planned_steps(10.0, 0.1) == 20  # a budget smaller than the overhead still trains a few steps


def test_gpu_check__a_pretrained_model_that_cannot_load_stops_it_before_any_part(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--pretrained", str(tmp_path / "none"),
                           "--json", str(tmp_path / "gpu.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "modality.pretrained=" in done.stderr and "local folder" in done.stderr
    assert not (tmp_path / "gpu.json").exists()  # nothing was measured


def test_gpu_check_fine_tune_settings_are_the_ones_the_recipe_names():
    from benchmarks.gpu_check import FINE_TUNE
    from tests.conftest import ROOT

    header = (ROOT / "recipes" / "image_cifar10_pretrained.yaml").read_text()
    assert all(setting in header for setting in FINE_TUNE), [x for x in FINE_TUNE if x not in header]


def test_gpu_check_render__the_h200_report_names_the_card_and_peak_fraction():
    import json

    from benchmarks.gpu_check import render
    from tests.conftest import ROOT

    report = json.loads((ROOT / "benchmarks" / "results" / "gpu_check_h200.json").read_text())
    text = render(report)
    assert "NVIDIA H200" in text and "% of bf16 peak" in text
    assert "| dmssl | bf16+cl |" in text


def test_bf16_peak_lookup_prefers_the_specific_name():
    from benchmarks.speed import bf16_peak_tflops, wrn_step_flops

    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bf16_peak_tflops("Some CPU") is None
    assert wrn_step_flops(1000) == pytest.approx(1.29e12)


def _finished_run(folder, objective, seed, test, dev, code_version="def5678"):
    folder.mkdir(parents=True)
    summary = {"objective": objective, "seed": seed, "test_accuracy": test, "dev_accuracy": dev, "cpu_threads": 1,
               "code_version": code_version}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_study_table__rows_from_summaries_in_seed_order_and_written_between_markers(tmp_path, capsys):
    from benchmarks.study_table import main

    for seed, (test, dev) in enumerate([(0.50, 0.40), (0.70, 0.60), (0.60, 0.50)]):
        _finished_run(tmp_path / "a" / f"dmssl-s{seed}", "dmssl", seed, test, dev)
    _finished_run(tmp_path / "b" / "sscl-s0", "sscl", 0, 0.55, None)
    page = tmp_path / "page.md"
    page.write_text("top\n<!-- s:start -->\nold\n<!-- s:end -->\nbottom\n")
    main(["--row", "ramp", str(tmp_path / "a" / "dmssl-s*"), "--row", "-", str(tmp_path / "b" / "sscl-s0"),
          "--commit", "abc1234", "--write", str(page), "--section", "s"])
    text = page.read_text()
    assert "old" not in text and text.startswith("top\n") and text.endswith("bottom\n")
    assert "at commit abc1234" in text
    assert "| ramp | dmssl | 50.00 +- 10.00 | **60.00 +- 10.00** | 3 | 50.0, 70.0, 60.0 |" in text
    assert "| - | sscl | - | **55.00 +- 0.00** | 1 | 55.0 |" in text
    main(["--row", "-", str(tmp_path / "b" / "sscl-s0"), "--write", str(page), "--section", "s"])
    assert "at commit def5678;" in page.read_text()


def test_study_table__paired_differences_from_a_chosen_row_by_seed(tmp_path, capsys):
    from benchmarks.study_table import main

    for seed, (dm, ss) in enumerate([(0.80, 0.70), (0.90, 0.85), (0.70, 0.75)]):
        _finished_run(tmp_path / "dm" / f"s{seed}", "dmssl", seed, dm, dm)
        _finished_run(tmp_path / "ss" / f"s{seed}", "sscl", seed, ss, ss)
    _finished_run(tmp_path / "sup" / "s7", "supervised", 7, 0.5, 0.5)  # no seed in common with row 1
    main(["--row", "mmd", str(tmp_path / "dm" / "s*"), "--row", "-", str(tmp_path / "ss" / "s*"),
          "--row", "-", str(tmp_path / "sup" / "s7"), "--paired", "1"])
    out = capsys.readouterr().out
    # differences 10, 5, -5 points: mean 3.33, stdev 7.64, SE 4.41, t 0.8, ahead on 2 of 3
    assert "| row 1 minus this row (paired) |" in out
    assert "| - | sscl | 76.67 +- 7.64 | **76.67 +- 7.64** | 3 | 70.0, 85.0, 75.0 | +3.33 (SE 4.41, t 0.8), ahead on 2/3 |" in out
    assert "| mmd | dmssl |" in out and "80.0, 90.0, 70.0 | - |" in out
    assert "| no shared seed |" in out
    with pytest.raises(SystemExit):
        main(["--row", "mmd", str(tmp_path / "dm" / "s*"), "--paired", "2"])


def test_study_table__refuses_an_unfinished_run_and_a_row_of_two_objectives(tmp_path):
    from benchmarks.study_table import main

    (tmp_path / "running").mkdir()
    with pytest.raises(SystemExit, match="no summary.json"):
        main(["--row", "x", str(tmp_path / "running")])
    _finished_run(tmp_path / "a", "dmssl", 0, 0.5, 0.5)
    _finished_run(tmp_path / "b", "sscl", 1, 0.5, 0.5)
    with pytest.raises(SystemExit, match="mixes objectives"):
        main(["--row", "x", str(tmp_path / "a"), str(tmp_path / "b")])


def test_matching_gradient__scales_with_lambda_and_refuses_a_run_without_matching(tmp_path):
    import dmssl
    from benchmarks import matching_gradient

    common = dict(trainer__max_steps=2, trainer__eval_every=2, trainer__progress_bar=False,
                  trainer__save_embeddings=False, data__batch_size=8, data__mu=2, data__num_workers=0)
    run = dmssl.fit("quickstart", output_dir=str(tmp_path / "dm"), **common)
    points = matching_gradient.measure_run(run.run_dir, batches=1)
    in_features = dmssl.fit("quickstart", objective__dm_space="features", output_dir=str(tmp_path / "dmf"), **common)
    assert matching_gradient.measure_run(in_features.run_dir, batches=1)[1]["grad_dm"] > 0
    assert [p["step"] for p in points] == [0, 2]  # the untrained model, then the run's one checkpoint
    for p in points:
        assert p["grad_rest"] > 0 and p["grad_dm"] > 0 and -1 <= p["cosine"] <= 1
        assert p["ratio"] == pytest.approx(p["grad_dm"] / p["grad_rest"])

    # The same step with the weight doubled: the matching gradient doubles, the rest stays.
    cfg = matching_gradient.read_run_config(run.run_dir)
    adapter = matching_gradient.build_adapter(cfg)
    data = matching_gradient.split_run_data(adapter.load(), cfg)
    objective = matching_gradient.objective_from_config(cfg, data.num_classes)
    model = matching_gradient.SSLModel(adapter.build_encoder(), data.num_classes, cfg.model.proj_hidden_dim,
                                       cfg.model.proj_dim)
    steps = matching_gradient.StepDataset(adapter, data.labeled, data.labeled_labels, [s for s, _ in data.pool],
                                          [y for _, y in data.pool], 8, 2, objective.unlabeled_views, 1, 0)
    once = matching_gradient.measure_step(model, objective, steps[0], 0)
    objective.options.lambda_dm *= 2
    twice = matching_gradient.measure_step(model, objective, steps[0], 0)
    assert twice["grad_dm"] == pytest.approx(2 * once["grad_dm"]) and twice["grad_rest"] == pytest.approx(once["grad_rest"])

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"runs/x": points}))
    page = tmp_path / "page.md"
    page.write_text("<!-- matching-gradient:start -->\n<!-- matching-gradient:end -->\n")
    matching_gradient.main(["--from-json", str(report), "--write", str(page)])
    rows = [line for line in page.read_text().splitlines() if line.startswith("| `runs/x` |")]
    assert len(rows) == 2 and f"**{points[1]['ratio']:.3f}**" in rows[1]

    sscl = dmssl.fit("quickstart", objective__name="sscl", output_dir=str(tmp_path / "sscl"), **common)
    with pytest.raises(dmssl.ConfigError, match="only for 'dmssl'"):
        matching_gradient.measure_run(sscl.run_dir, batches=1)


@pytest.mark.slow
def test_linear_probe__fits_on_the_runs_own_splits_and_encodes_each_sample_once(tmp_path):
    """The probe sees exactly the splits train.py draws for the seed, and learns (well above chance on digits)."""
    from benchmarks.linear_probe import FeatureCache, main, probe_seed, sample_key
    from dmssl.modality import build_adapter
    from dmssl.recipe import resolve
    from dmssl.trainer import split_run_data

    overrides = ["recipe=quickstart", "data.dev_size=100"]
    cfg = resolve([*overrides, "seed=0"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    cache = FeatureCache(adapter, 256)
    encoded = []
    forward = cache.encoder.forward
    cache.encoder.forward = lambda batch: encoded.append(len(next(iter(batch.values())) if isinstance(batch, dict) else batch)) or forward(batch)
    result = probe_seed(overrides, 0, raw, cache, pool_size=200)
    data = split_run_data(raw, cfg)
    assert (result["labeled"], result["dev"], result["pool"], result["test"]) == (50, 100, 200, len(data.test))
    assert result["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and result["threshold"] in (0.6, 0.75, 0.9)
    assert result["test_accuracy"]["linear probe"] > 0.3  # 10 classes: chance is 0.1; mismatched labels would sit there
    assert set(result["test_accuracy"]) == {"linear probe", "self-training", "dev labels as training labels"}
    unique = {sample_key(s) for s in [*data.labeled, *data.dev, *data.test, *(s for s, _ in data.pool[:200])]}
    assert sum(encoded) == len(cache.features) == len(unique)
    probe_seed(overrides, 0, raw, cache, pool_size=200)  # the same seed again: nothing new to encode
    assert sum(encoded) == len(unique)

    page = tmp_path / "page.md"
    page.write_text("<!-- probe-x:start -->\nold\n<!-- probe-x:end -->\n")
    main([*overrides, "--seeds", "0", "--pool", "100", "--write", str(page), "--section", "probe-x"])
    text = page.read_text()
    assert "\nold\n" not in text and "| linear probe | 50 labels |" in text and "Chosen on dev: seed 0: C=" in text
    assert re.search(r"Encoded [\d,]+ samples in [\d.]+ s \([\d.]+ samples/s, \d+ thread", text)


def test_auto_versus_fp32__interleaves_whole_runs_and_names_the_cpu(monkeypatch):
    import benchmarks.speed as speed

    monkeypatch.setenv("DMSSL_AUTO_PRECISION", "no")  # auto's choice is not what this tests: the plumbing is
    auto = speed.auto_versus_fp32(steps=2, rounds=2, extra=["data.num_workers=0", "trainer.save_embeddings=false",
                                                            "data.batch_size=8", "data.mu=2"])
    assert [len(auto["runs"][m]) for m in ("auto", "no")] == [2, 2]
    assert all(r["steps"] == 2 for m in ("auto", "no") for r in auto["runs"][m])
    assert auto["runs"]["auto"][0]["precision_reason"] == "auto: DMSSL_AUTO_PRECISION=no"
    assert auto["auto_over_fp32_wall"] > 0 and auto["cpu"]["kind"] in ("amx", "avx512_bf16", "no native bf16")
    text = speed.auto_markdown({"date": "2026-12-01", "machine": "x86_64, 2 threads, cpu", "command": "c", "auto": auto})
    assert "| `trainer.mixed_precision=auto` (the default) | fp32 |" in text and "auto / fp32 wall time" in text


def test_shift_reports__measures_a_recipe_as_a_run_starts_and_renders_one_row_per_label(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from benchmarks import shift_reports

    out = tmp_path / "cases.json"
    for label in ("digits", "digits"):  # the same label twice: one row, replaced
        monkeypatch.setattr(sys, "argv", ["shift_reports.py", "--label", label, "--json", str(out), "recipe=quickstart",
                                          "data.num_workers=0"])
        assert shift_reports.main() == 0
    cases = json.loads(out.read_text())
    assert [c["label"] for c in cases] == ["digits"]
    report = cases[0]["report"]
    assert report["num_labeled"] == 50 and report["num_unlabeled"] == 256 and report["permutations"] == 200
    printed = capsys.readouterr().out
    assert "shift: MMD^2" in printed and "| digits | small_cnn (random init) | 50 / 256 |" in printed
    # the same figures as the line a run prints at its start
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    summary = fit(resolve(["recipe=quickstart", "data.num_workers=0", "trainer.max_steps=1", "trainer.eval_every=1",
                           "trainer.max_minutes=null", "trainer.mixed_precision=no", "trainer.progress_bar=false",
                           "trainer.save_embeddings=false", f"output_dir={tmp_path / 'run'}"]))
    assert summary["shift"]["mmd2"] == report["mmd2"] and summary["shift"]["p_value"] == report["p_value"]


def test_quality_jobs__cells_run_concurrently_and_rows_keep_the_grid_order(tmp_path, monkeypatch):
    import threading
    import time

    import benchmarks.quality as quality

    running, most = [0], [0]
    lock = threading.Lock()

    def fake_cell(args, objective, distance, seed):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05 if objective == "supervised" else 0.01)  # the first cells finish last
        with lock:
            running[0] -= 1
        return {"test_accuracy": {"supervised": 0.5, "sscl": 0.6}[objective] + seed / 100, "steps": 3}

    monkeypatch.setattr(quality, "run_cell", fake_cell)
    for jobs in ("1", "3"):
        monkeypatch.setattr("sys.argv", ["quality.py", "digits", "--cells", "supervised", "sscl", "--seeds", "0", "1",
                                         "--jobs", jobs, "--runs", str(tmp_path / jobs)])
        most[0] = 0
        assert quality.main() == 0
        report = json.loads((tmp_path / jobs / "quality-digits.json").read_text())
        assert [r["objective"] for r in report["rows"]] == ["supervised", "sscl"]
        assert [r["accuracies"] for r in report["rows"]] == [[0.5, 0.51], [0.6, 0.61]]
        assert most[0] == int(jobs)


def test_linear_probe__from_the_runs_feature_cache_sees_the_cached_features(tmp_path):
    """--feature-cache: the same splits, the clean views read from train.py's cache (no encoding pass)."""
    import numpy as np
    import torch

    from benchmarks.linear_probe import FeatureCache, RunFeatureCache, probe_seed
    from dmssl.modality import build_adapter
    from dmssl.recipe import resolve

    overrides = ["recipe=quickstart", "data.dev_size=100", "model.freeze=all", "model.cached_views=1",
                 f"data.cache_dir={tmp_path}", "trainer.mixed_precision=no"]  # fp32 cache: comparable to encoding
    cfg = resolve([*overrides, "seed=0"])
    adapter = build_adapter(cfg)
    raw = adapter.load()
    torch.manual_seed(0)
    encoded = FeatureCache(adapter, 256)
    torch.manual_seed(0)
    cached = RunFeatureCache(adapter, raw, FeatureCache(adapter, 256).encoder)
    by_encoding = probe_seed(overrides, 0, raw, encoded, pool_size=100)
    from_cache = probe_seed(overrides, 0, raw, cached, pool_size=100)
    assert any(p.name.startswith("features-") for p in tmp_path.iterdir())
    assert [from_cache[k] for k in ("labeled", "dev", "pool", "test")] == [by_encoding[k] for k in ("labeled", "dev", "pool", "test")]
    # the cache stores float16: the same features to its precision, so the same probe up to a few test samples
    from dmssl.trainer import split_run_data

    data = split_run_data(raw, cfg)
    rows = cached.rows(data, cfg)
    assert np.allclose(cached(rows.test[:20]), encoded(data.test[:20]), atol=2e-2, rtol=1e-2)
    assert abs(from_cache["test_accuracy"]["linear probe"] - by_encoding["test_accuracy"]["linear probe"]) <= 0.02


def test_pairs_table__a_row_per_finished_pair_the_average_and_the_paired_difference(tmp_path, capsys):
    from benchmarks.pairs_table import main

    def runs(pair, accuracies, probe=None):
        for cell, values in accuracies.items():
            for seed, acc in enumerate(values):
                folder = tmp_path / pair / "amazon_shift" / f"{cell}-s{seed}"
                folder.mkdir(parents=True)
                (folder / "summary.json").write_text(json.dumps({"test_accuracy": acc}))
        if probe:
            (tmp_path / pair / "probe.json").write_text(json.dumps(
                {"seeds": [{"seed": s, "test_accuracy": {"linear probe": a}} for s, a in enumerate(probe)]}))

    runs("books-dvd", {"sscl": [0.70, 0.72], "dmssl-mmd": [0.74, 0.77]}, probe=[0.71, 0.71])
    runs("dvd-books", {"sscl": [0.80, 0.80], "dmssl-mmd": [0.78, 0.79]}, probe=[0.75, 0.75])
    runs("dvd-kitchen", {"sscl": [0.80], "dmssl-mmd": [0.78, 0.79]}, probe=[0.75, 0.75])  # a seed missing
    page = tmp_path / "page.md"
    page.write_text("<!-- pairs:start -->\n<!-- pairs:end -->\n")
    assert main([str(tmp_path), "--preset", "amazon_shift", "--write", str(page)]) == 0
    text = page.read_text()
    assert "| pair | probe | sscl | dmssl (MMD) | dmssl - best other | paired SE |" in text
    assert "| books -> dvd | 71.0 | 71.0 | **75.5** | +4.5 (probe) | 1.5 |" in text  # diffs 3 and 6: SE 2.12 / sqrt 2
    assert "| dvd -> books | 75.0 | **80.0** | 78.5 | -1.5 (sscl) | 0.5 |" in text
    assert "| **average** | 73.0 | 75.5 | **77.0** | | |" in text
    assert "Not finished, left out: dvd-kitchen." in text
    # over the 4 runs of the two finished pairs: dmssl - sscl = 4, 5, -2, -1 -> mean 1.5, SE 3.5 / 2
    assert "| sscl | +1.50 | 1.76 | 1 of 2 |" in text and "| probe | +4.00 | 0.71 | 2 of 2 |" in text  # 3, 6, 3, 4
    assert "shift z" not in text  # no run recorded a shift report
    for seed, z in enumerate([100.0, 120.0]):  # one pair's runs record one
        summary = tmp_path / "books-dvd" / "amazon_shift" / f"sscl-s{seed}" / "summary.json"
        summary.write_text(json.dumps({"test_accuracy": [0.70, 0.72][seed], "shift": {"z": z}}))
    assert main([str(tmp_path), "--preset", "amazon_shift", "--write", str(page)]) == 0
    text = page.read_text()
    assert "| pair | shift z | probe | sscl | dmssl (MMD) | dmssl - best other | paired SE |" in text
    assert "| books -> dvd | 110.0 | 71.0 | 71.0 | **75.5** | +4.5 (probe) | 1.5 |" in text
    assert "| dvd -> books | - | 75.0 | **80.0** |" in text and "| **average** | | 73.0 |" in text


def test_pairs_table__one_seed_shows_no_standard_error(tmp_path):
    from benchmarks.pairs_table import main

    for pair, values in {"books-dvd": (0.70, 0.74), "dvd-books": (0.80, 0.78)}.items():
        for cell, acc in zip(("sscl", "dmssl-mmd"), values):
            folder = tmp_path / pair / "amazon_shift" / f"{cell}-s0"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({"test_accuracy": acc}))
    page = tmp_path / "page.md"
    page.write_text("<!-- pairs:start -->\n<!-- pairs:end -->\n")
    assert main([str(tmp_path), "--preset", "amazon_shift", "--write", str(page)]) == 0
    text = page.read_text()
    assert "nan" not in text
    assert "| books -> dvd | 70.0 | **74.0** | +4.0 (sscl) | - |" in text
    assert "| sscl | +1.00 | 3.00 | 1 of 2 |" in text  # diffs 4 and -2 over the 2 runs: SE 4.24 / sqrt 2


def test_quality_cell_extra__reaches_only_its_cell_and_bad_groups_are_named(tmp_path, monkeypatch, capsys):
    import pytest

    import benchmarks.quality as quality

    commands = {}

    def fake_cell(args, objective, distance, seed):
        commands[(objective, distance)] = quality.cell_command(args, objective, distance, seed)[0]
        return {"test_accuracy": 0.5, "steps": 3}

    monkeypatch.setattr(quality, "run_cell", fake_cell)
    base = ["quality.py", "digits", "--cells", "sscl", "dmssl:mmd", "--seeds", "0", "--runs", str(tmp_path),
            "--extra", "trainer.lr=0.01"]
    monkeypatch.setattr("sys.argv", base + ["--cell-extra", "dmssl:mmd", "objective.lambda_dm=3"])
    assert quality.main() == 0
    assert commands[("dmssl", "mmd")][-2:] == ["trainer.lr=0.01", "objective.lambda_dm=3"]
    assert commands[("sscl", None)][-1] == "trainer.lr=0.01" and "objective.lambda_dm=3" not in commands[("sscl", None)]
    monkeypatch.setattr("sys.argv", base[:4] + ["dmssl:coral"] + base[4:] + ["--cell-extra", "dmssl:*", "objective.lambda_dm=1"])
    assert quality.main() == 0
    assert commands[("dmssl", "mmd")][-1] == commands[("dmssl", "coral")][-1] == "objective.lambda_dm=1"
    assert commands[("sscl", None)][-1] == "trainer.lr=0.01"
    commands.clear()
    monkeypatch.setattr("sys.argv", base[:4] + base[5:] + ["--cell-extra", "dmssl:*", "objective.lambda_dm=1"])
    assert quality.main() == 0  # a grid without dmssl cells: the wildcard names none
    assert list(commands) == [("sscl", None)] and commands[("sscl", None)][-1] == "trainer.lr=0.01"
    for bad, says in ((["--cell-extra", "dmsl:*", "trainer.lr=1"], "unknown objective 'dmsl'; allowed:"),
                      (["--cell-extra", "fixmatch", "trainer.lr=1"], "not a cell of this grid; its cells: sscl, dmssl:mmd"),
                      (["--cell-extra", "dmssl:l2", "trainer.lr=1"], "unknown cell 'dmssl:l2'"),
                      (["--cell-extra", "sscl", "lambda"], "expected KEY=VALUE overrides after the cell, got ['lambda']")):
        monkeypatch.setattr("sys.argv", base + bad)
        with pytest.raises(SystemExit) as exit_info:
            quality.main()
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_digits_shift_script_passes_cell_extras_to_every_grid_unglobbed(tmp_path):
    """benchmarks/digits_shift.sh with a stand-in `python` that records the quality grid's arguments."""
    import os
    import stat
    import subprocess

    from tests.conftest import ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "dmssl:mmd").write_text("")  # a file a glob of 'dmssl:*' would match
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DIRECTIONS="usps-mnist", PROTOCOLS="a",
               CELL_EXTRA="dmssl:* objective.lambda_dm=1")
    script = ROOT / "benchmarks" / "digits_shift.sh"
    subprocess.run(["bash", str(script), "DATA", str(tmp_path / "runs"), "0 1", "sscl dmssl:mmd", "trainer.lr=0.1"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    args = (tmp_path / "runs" / "usps-mnist-a" / "quality.log").read_text().split("\n")
    assert args[args.index("--seeds") + 1: args.index("--seeds") + 3] == ["0", "1"]
    extra = args[args.index("--extra") + 1: args.index("--cell-extra")]
    assert extra == ["data.labeled_groups=[usps]", "data.target_groups=[mnist]", "data.labels_per_class=null",
                     "trainer.lr=0.1"]
    assert args[args.index("--cell-extra") + 1: args.index("--cell-extra") + 3] == ["dmssl:*", "objective.lambda_dm=1"]
    env.pop("CELL_EXTRA")
    subprocess.run(["bash", str(script), "DATA", str(tmp_path / "runs"), "0", "sscl"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    assert "--cell-extra" not in (tmp_path / "runs" / "usps-mnist-a" / "quality.log").read_text()
