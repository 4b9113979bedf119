"""The benchmark scripts' report plumbing (their timings are not tested: they are measurements)."""

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
