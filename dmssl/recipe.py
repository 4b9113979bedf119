"""Recipes and overrides into a validated `Config`.

Resolution order (later wins): dataclass defaults < the modality adapter's `defaults` < the recipe
< command-line overrides. Values are coerced by each field's annotation (never by guessing from the
text), so `trainer.lr=1` is a float and `5e-4` in YAML is a float too. Unknown keys, wrong types,
impossible values, renamed keys and non-finite numbers raise `ConfigError` with the nearest valid key or
the allowed values, before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dmssl.config import (
    METHOD_SECTIONS,
    MOVED_KEYS,
    SECTIONS,
    TOP_LEVEL,
    Config,
    MethodConfig,
    ModalityConfig,
    check_finite,
    flatten,
    method_registries,
)
from dmssl.errors import ConfigError
from dmssl.trust import TrustPlugins, check_trusted

# An installed package carries the recipes inside dmssl/ (package data); a checkout keeps them at its top.
_INSTALLED_RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPES_DIR = _INSTALLED_RECIPES if _INSTALLED_RECIPES.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------- recipes and overrides


def recipe_names() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe by name (a file in `recipes/`) or by path to a YAML file."""
    path = Path(name_or_path)
    try:
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            path = RECIPES_DIR / f"{name_or_path}.yaml"
        found = path.is_file()
    except (OSError, ValueError):  # a name longer than the file system allows, a NUL byte
        found = False
    if not found:
        names = recipe_names()
        near = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown recipe {name_or_path!r}{hint} Recipes: {', '.join(names)} (or a path to a .yaml file)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {str(err)[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    check_string_keys(data, str(path))
    data.setdefault("recipe", path.stem)
    return data


def check_string_keys(tree: dict[str, Any], source: str, prefix: str = "", depth: int = 0) -> None:
    """Every key of a recipe is a name (YAML allows `1: 2`), and the nesting stays shallow."""
    if depth > 8:
        raise ConfigError(f"recipe {source!r} nests deeper than any setting ({prefix.rstrip('.')})")
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"recipe {source!r}: the key {key!r} at {prefix or 'the top'} is not a name")
        if isinstance(value, dict):
            check_string_keys(value, source, f"{prefix}{key}.", depth + 1)


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Split `key=value` tokens on the first `=` (values may contain `=`)."""
    pairs = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {token!r} is not of the form key=value (e.g. trainer.max_steps=500)")
        pairs.append((key.strip(), value))
    return pairs


def apply_override(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `a.b.c`, creating sections as needed."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])} is a value, not a section; cannot set {dotted_key}")
        node = child
    node[leaf] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `top` over `base`, recursing into sections present in both."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- typed conversion


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value or an override string to `annotation`, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; allowed: {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not {_describe(annotation)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}={value!r} is not a bool (true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an int")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not a float")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        return str(value)
    if annotation is Any:
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def section_from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the nearest valid one."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a section (a mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(f"{prefix}.{key}", [f"{prefix}.{n}" for n in names])
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    shown = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + ", ..."
    return ConfigError(f"unknown key {key!r}{hint} Valid keys: {shown}")


def method_keys(section: str) -> dict[str, list[str]]:
    """name -> the option keys of that registered method, for one method section."""
    registry, _ = method_registries()[section]
    return {name: [f.name for f in dataclasses.fields(registry.get(name).Options)] for name in registry.names()}


def all_keys(options_cls: type | None = None) -> list[str]:
    """Every dotted key a recipe or override may set."""
    keys = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for section in METHOD_SECTIONS:
        keys.append(f"{section}.name")
        keys += sorted({f"{section}.{k}" for names in method_keys(section).values() for k in names})
    keys += ["modality.name"] + list(TOP_LEVEL)
    if options_cls is not None:
        keys += [f"modality.{f.name}" for f in dataclasses.fields(options_cls)]
    return keys


def method_from_dict(section: str, values: Any, explicit: set[str], valid: list[str]) -> MethodConfig:
    """`{name: dmssl, lambda_dm: 2}` -> MethodConfig("dmssl", DistributionMatching.Options(lambda_dm=2)).

    A key that another method of the section declares is dropped when it came from a recipe or defaults
    (a recipe written for dmssl still runs with objective.name=fixmatch), and refused when it was given on
    the command line (it would do nothing). A key no method declares is refused with the nearest one.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be a section (a mapping), got {values!r}")
    registry, default = method_registries()[section]
    values = dict(values)
    name = coerce(values.pop("name", default), str, f"{section}.name")
    try:
        cls = registry.get(name)
    except ConfigError as err:  # the registry's message lists the registered names
        raise ConfigError(f"{section}.name={name!r}: {err}") from None
    own = {f.name for f in dataclasses.fields(cls.Options)}
    others = method_keys(section)
    kept = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key in own:
            kept[key] = value
        elif any(key in keys for keys in others.values()):
            if dotted in explicit:
                owners = ", ".join(n for n, keys in others.items() if key in keys)
                raise ConfigError(f"{dotted} is an option of {section}.name={owners}, not of {section}.name={name}; "
                                  f"options of {name}: {', '.join(sorted(own)) or 'none'}")
        else:
            raise unknown_key(dotted, valid)
    return MethodConfig(name=name, options=section_from_dict(cls.Options, kept, section))


def build_config(tree: dict[str, Any], options_cls: type | None, explicit: set[str] | None = None,
                 renamed: dict[str, str] | None = None) -> Config:
    """Turn a merged dict (recipe + overrides + defaults) into a validated `Config`.

    `explicit`: the dotted keys given on the command line (stricter about keys of another method).
    `renamed`: the adapter's old key -> new key, beside the core's `MOVED_KEYS`.
    """
    explicit = explicit or set()
    moved = MOVED_KEYS | (renamed or {})
    for key, value in flatten(tree).items():
        if key in moved:
            raise ConfigError(f"{key} was renamed: use {moved[key]}={value}")
    valid = all_keys(options_cls)
    known = set(SECTIONS) | set(METHOD_SECTIONS) | {"modality"} | set(TOP_LEVEL)
    for key in tree:
        if key not in known:
            raise unknown_key(key, valid)
    sections = {name: section_from_dict(cls, tree.get(name) or {}, name) for name, cls in SECTIONS.items()}
    methods = {name: method_from_dict(name, tree.get(name) or {}, explicit, valid) for name in METHOD_SECTIONS}
    modality_tree = dict(tree.get("modality") or {})
    name = coerce(modality_tree.pop("name", "image"), str, "modality.name")
    options = section_from_dict(options_cls, modality_tree, "modality") if options_cls else None
    if options_cls is None and modality_tree:
        raise unknown_key(f"modality.{next(iter(modality_tree))}", valid)
    top = {k: coerce(tree[k], typing.get_type_hints(Config)[k], k) for k in TOP_LEVEL if k in tree}
    cfg = Config(modality=ModalityConfig(name=name, options=options), **sections, **methods, **top)
    for section in ("data", "model", "trainer", *METHOD_SECTIONS):
        check_finite(getattr(cfg, section), f"{section}.")
    check_finite(options, "modality.")
    cfg.validate()
    check_methods_fit(cfg)
    return cfg


def check_methods_fit(cfg: Config) -> None:
    """Combinations of methods that would do nothing, or nothing sensible: refused before data loads."""
    objective = method_registries()["objective"][0].get(cfg.objective.name)
    distance = method_registries()["distance"][0].get(cfg.distance.name)
    if getattr(distance, "learns", False) and not objective.unlabeled_views:
        raise ConfigError(f"distance.name={cfg.distance.name} trains a domain classifier on the unlabeled data, but "
                          f"objective.name={cfg.objective.name} uses none; choose dmssl (or another distance)")
    options = cfg.objective.options
    if (getattr(distance, "conditions_on_predictions", False) and getattr(options, "labeled_memory", 0)
            and getattr(options, "dm_space", "projection") == "features"):
        raise ConfigError(f"distance.name={cfg.distance.name} conditions on the predictions of the labeled memory's "
                          "rows, which objective.dm_space=features does not keep; set objective.labeled_memory=0 "
                          "or objective.dm_space=projection")


def import_plugins(modules: list[str]) -> None:
    """Import each module (once): a module that registers an objective, distance or pseudo-labeller makes
    its name valid in this config (`plugins=[mypkg.losses]`)."""
    for module in modules:
        check_module_name(module, "plugins")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {module!r} ({err}); is it on PYTHONPATH or installed "
                              "(pip install -e your package)?") from None
        except Exception as err:  # the plugin's own code failed: say which plugin, keep its message
            raise ConfigError(f"plugins: importing {module!r} raised {type(err).__name__}: {err}") from None


MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_module_name(name: str, key: str) -> None:
    """A dotted Python module name (`pkg.module`), not a path or a relative import."""
    if not MODULE_NAME.match(name):
        raise ConfigError(f"{key}: {name!r} is not a Python module name; expected dotted names such as mypkg.losses")


def config_from_dict(tree: dict[str, Any], trust_plugins: TrustPlugins = True, source: str = "the config") -> Config:
    """A run's saved config.yaml (a resolved config, as `config_to_dict` wrote it) back into a `Config`.

    `trust_plugins` says which modules the config may import (dmssl/trust.py); readers of folders that
    someone else may have written pass False."""
    from dmssl.modality import load_modality

    if not isinstance(tree, dict):
        raise ConfigError(f"{source} is not a mapping of settings (it holds a {type(tree).__name__})")
    check_trusted(tree, source, trust_plugins)
    tree = dict(tree, resume="never", overwrite=False)  # reading a run, not continuing it
    import_plugins(coerce(tree.get("plugins", []), list[str], "plugins"))
    adapter_cls = load_modality(str((tree.get("modality") or {}).get("name", "image")))
    return build_config(tree, getattr(adapter_cls, "Options", None), None, getattr(adapter_cls, "renamed_keys", None))


def resolve(tokens: list[str]) -> Config:
    """Parse `recipe=NAME key=value ...` into a Config (adapter defaults applied)."""
    return resolve_pairs(parse_overrides(tokens))


def resolve_pairs(pairs: list[tuple[str, Any]]) -> Config:
    """(dotted key, value) pairs, `recipe` among them, into a Config. Values are strings from a command line,
    or Python values from `dmssl.fit`; both go through the same coercion and checks."""
    from dmssl.modality import load_modality  # late import: the adapter contract imports torch

    explicit = {k for k, _ in pairs}
    recipes = [str(v) for k, v in pairs if k == "recipe"]
    tree: dict[str, Any] = load_recipe(recipes[-1]) if recipes else {"recipe": "custom"}
    for key, value in pairs:
        if key != "recipe":
            apply_override(tree, key, value)
    import_plugins(coerce(tree.get("plugins", []), list[str], "plugins"))
    modality_name = str((tree.get("modality") or {}).get("name", "image"))
    adapter_cls = load_modality(modality_name)
    tree = deep_merge(getattr(adapter_cls, "defaults", {}) or {}, tree)
    cfg = build_config(tree, getattr(adapter_cls, "Options", None), explicit, getattr(adapter_cls, "renamed_keys", None))
    encoders = getattr(adapter_cls, "encoders", None)
    if encoders and cfg.model.encoder not in encoders:
        near = difflib.get_close_matches(cfg.model.encoder, encoders, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"model.encoder={cfg.model.encoder!r} is not an encoder of modality {modality_name!r}{hint} "
                          f"Allowed: {', '.join(encoders)}")
    return cfg
