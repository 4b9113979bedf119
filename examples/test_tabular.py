"""The example adapter passes the conformance kit and trains from its recipe."""

from pathlib import Path

from dmssl.recipe import resolve
from dmssl.testing import check_adapter
from examples.tabular import TabularModality

RECIPE = Path(__file__).with_name("tabular.yaml")


def test_tabular_adapter_conforms():
    report = check_adapter(TabularModality, resolve([f"recipe={RECIPE}"]))
    assert report.passed and len(report.passed_checks) >= 10


def test_tabular_recipe_trains(tmp_path):
    from dmssl.trainer import fit

    summary = fit(resolve([f"recipe={RECIPE}", f"output_dir={tmp_path}", "trainer.max_steps=100",
                           "trainer.progress_bar=false"]))
    assert summary["test_accuracy"] > 0.75  # above the 0.63 of always answering the majority class
