"""Docs that are generated or copied from code must match it, and the site must build without warnings."""

import re
import shutil
import subprocess
import sys

import pytest

from dmssl.reference import generate
from tests.conftest import ROOT


def test_config_reference_is_up_to_date():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == generate(builtin_only=True), "run: python -m dmssl.reference > docs/config-reference.md"


def test_adapter_tutorial_shows_the_example_files_verbatim():
    page = (ROOT / "docs" / "writing-an-adapter.md").read_text()
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", page, flags=re.S)
    for name in ("tabular.py", "tabular.yaml", "test_tabular.py"):
        assert (ROOT / "examples" / name).read_text() in blocks, f"docs/writing-an-adapter.md is out of date for {name}"


def test_docs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not (ROOT / ".venv" / "bin" / "mkdocs").exists():
        pytest.importorskip("mkdocs", reason="mkdocs comes with the [dev] extra")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_using_a_model_page_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    page = (ROOT / "docs" / "using-a-model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/using-a-model.md", "exec"), namespace)  # noqa: S102 - the page's own code
    assert (tmp_path / "exports" / "digits" / "model.safetensors").is_file()
    assert "# dmssl model: quickstart" in capsys.readouterr().out
