"""Recipes and overrides: mapping onto dataclasses, coercion by annotation, and errors that name the bad value."""

import subprocess
import sys

import pytest
import yaml

from dmssl.config import Config, config_to_dict
from dmssl.errors import ConfigError
from dmssl.recipe import build_config, recipe_names, resolve
from modalities.image import ImageOptions
from tests.conftest import ROOT


def test_resolve__recipe_and_overrides_are_typed():
    cfg = resolve(["recipe=quickstart", "trainer.max_steps=7", "trainer.lr=1", "distance.name=wasserstein",
                   "distance.num_projections=64", "modality.hflip=true", "data.num_labels=none"])
    assert cfg.trainer.max_steps == 7
    assert cfg.trainer.lr == 1.0 and isinstance(cfg.trainer.lr, float)
    assert cfg.distance.name == "wasserstein" and cfg.distance.options.num_projections == 64
    assert resolve(["recipe=quickstart", "distance.median_scales=0.5,2"]).distance.options.median_scales == [0.5, 2.0]
    assert cfg.modality.options.hflip is True
    assert cfg.recipe == "quickstart"


def test_resolve__adapter_defaults_apply_unless_recipe_sets_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modality: {name: image}\ndata: {dataset: digits}\n")
    assert resolve([f"recipe={recipe}"]).distance.options.median_scales == [0.5, 1.0, 2.0]  # ImageModality.defaults
    assert resolve([f"recipe={recipe}", "distance.median_scales=[3]"]).distance.options.median_scales == [3.0]


def test_a_recipes_options_of_another_method_are_dropped_when_switching():
    # quickstart sets distance.median_scales (an MMD option) and objective.lambda_dm (a dmssl option).
    cfg = resolve(["recipe=quickstart", "objective.name=fixmatch", "distance.name=wasserstein"])
    assert cfg.objective.name == "fixmatch" and not hasattr(cfg.objective.options, "lambda_dm")
    assert cfg.distance.name == "wasserstein" and not hasattr(cfg.distance.options, "median_scales")
    with pytest.raises(ConfigError, match="distance.median_scales is an option of distance.name=mmd"):
        resolve(["recipe=quickstart", "distance.name=wasserstein", "distance.median_scales=[2]"])


def test_config__roundtrip_through_yaml():
    cfg = resolve(["recipe=quickstart", "objective.lambda_dm=0.25"])
    tree = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    assert build_config(tree, ImageOptions) == cfg


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_parses_and_validates(name):
    assert isinstance(resolve([f"recipe={name}"]), Config)


@pytest.mark.parametrize(("tokens", "message"), [
    (["recipe=quickstrat"], "unknown recipe 'quickstrat'; did you mean 'quickstart'"),
    (["recipe=quickstart", "trainer.max_stesp=5"], "unknown key 'trainer.max_stesp'; did you mean 'trainer.max_steps'"),
    (["recipe=quickstart", "objective.lamda_dm=1"], "did you mean 'objective.lambda_dm'"),
    (["recipe=quickstart", "trainer.max_steps=ten"], "trainer.max_steps='ten' is not an int"),
    (["recipe=quickstart", "trainer.lr=fast"], "trainer.lr='fast' is not a float"),
    (["recipe=quickstart", "modality.hflip=maybe"], "modality.hflip='maybe' is not a bool"),
    (["recipe=quickstart", "distance.name=wasserstien"], "did you mean 'wasserstein'"),
    (["recipe=quickstart", "objective.name=mixmatch"], "Available: dmssl, fixmatch, fixmatch_proto, sscl, supervised"),
    (["recipe=quickstart", "pseudo_label.threshold=1.5"], "must be in (0, 1]"),
    (["recipe=quickstart", "data.mu=0"], "data.mu=0 must be > 0"),
    (["recipe=quickstart", "trainer.max_steps=-3"], "trainer.max_steps=-3 must be > 0"),
    (["recipe=quickstart", "data.num_labels=40"], "are both set"),
    (["recipe=quickstart", "modality.name=nosuch"], "unknown modality 'nosuch'"),
    (["recipe=quickstart", "modality.name=os:path"], "is not an adapter"),
    (["recipe=quickstart", "modality.name=no_such_module:X"], "cannot import module 'no_such_module'"),
    (["recipe=quickstart", "trainer"], "is not of the form key=value"),
    (["recipe=quickstart", "banana=1"], "unknown key 'banana'"),
    (["recipe=quickstart", "resume=/no/such/file.pt"], "resume='/no/such/file.pt'"),
])
def test_resolve__errors_name_the_bad_value(tokens, message):
    with pytest.raises(ConfigError) as caught:
        resolve(tokens)
    assert message in str(caught.value)


def test_cli__user_error_exits_2_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "train.py", "recipe=quickstart", "trainer.max_stpes=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'trainer.max_steps'" in lines[0]


@pytest.mark.parametrize("name", ["resolve", "load_recipe", "parse_overrides", "config_from_dict"])
def test_names_that_moved_to_recipe_still_import_with_a_deprecation_warning(name):
    import dmssl.config
    import dmssl.recipe

    with pytest.warns(DeprecationWarning, match=f"dmssl.config.{name} moved to dmssl.recipe.{name}"):
        moved = getattr(dmssl.config, name)
    assert moved is getattr(dmssl.recipe, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        dmssl.config.no_such_name  # noqa: B018


def test_from_import_of_a_moved_name_works_as_the_adapter_tutorial_wrote_it():
    with pytest.warns(DeprecationWarning):
        from dmssl.config import resolve
    assert resolve(["recipe=quickstart"]).recipe == "quickstart"
