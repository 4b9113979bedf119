"""Registries and how adapters are found: module:Class references and the dmssl.modalities entry points."""

from importlib.metadata import EntryPoint

import pytest

import dmssl.modality as modality
from dmssl.errors import ConfigError
from dmssl.modality import load_modality
from dmssl.registry import Registry
from examples.tabular import TabularModality


def test_registry__duplicate_name_raises_and_unknown_name_suggests():
    reg = Registry("thing")
    reg.register("alpha")(dict)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(list)
    with pytest.raises(ConfigError, match="unknown thing 'alpah'; did you mean 'alpha'"):
        reg.get("alpah")


def test_load_modality__module_class_reference():
    assert load_modality("examples.tabular:TabularModality") is TabularModality


def test_load_modality__entry_point_of_an_installed_package(monkeypatch):
    fake = EntryPoint(name="tabular", value="examples.tabular:TabularModality", group=modality.ENTRY_POINT_GROUP)
    monkeypatch.setattr(modality, "entry_points", lambda group: [fake] if group == modality.ENTRY_POINT_GROUP else [])
    assert load_modality("tabular") is TabularModality
    with pytest.raises(ConfigError, match="unknown modality 'tabulr'; did you mean 'tabular'"):
        load_modality("tabulr")


def test_shipped_adapters_are_registered():
    assert {"image", "text", "audio"} <= set(modality.modality_names())


@pytest.mark.parametrize(("reference", "message"), [
    ("examples.tabular:Nope", "has no attribute 'Nope'"),
    ("examples.nothing_here:X", "cannot import module 'examples.nothing_here'"),
    ("examples.tabular:MLP", "is not an adapter"),
])
def test_load_modality__bad_references(reference, message):
    with pytest.raises(ConfigError, match=message):
        load_modality(reference)


def test_core_names_no_modality():
    # The core must not special-case a modality: no adapter module is imported or named in dmssl/.
    from pathlib import Path

    core = Path(modality.__file__).parent
    for path in core.glob("*.py"):
        text = path.read_text()
        for word in ("modalities.", "ImageModality", "TextModality", "AudioModality"):
            assert word not in text, f"{path.name} names {word}"
