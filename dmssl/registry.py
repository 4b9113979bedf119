"""Name -> factory registries, and how modality adapters are found.

`Registry` is a dict with two manners: registering a name twice is an error (not a silent overwrite),
and looking up an unknown name says which names exist and which one was probably meant.

Modality adapters are not imported by the core. They are found, in this order, as
1. `package.module:ClassName` (any importable class), or
2. a name in the `dmssl.modalities` entry-point group of an installed package (this project's own
   image, text and audio adapters are registered there in pyproject.toml).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from dmssl.errors import ConfigError

T = TypeVar("T")
ENTRY_POINT_GROUP = "dmssl.modalities"


class Registry(Generic[T]):
    """Maps names to factories (classes or functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` on a class or function."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def build(self, name: str, **options: Any) -> Any:
        """Call the factory for `name`, checking the options against its signature first."""
        factory = self.get(name)
        check_options(factory, options, f"{self.kind} {name!r}")
        return factory(**options)

    def names(self) -> list[str]:
        return sorted(self._items)


def unknown_name_message(kind: str, name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown {kind} {name!r}{hint} Available: {', '.join(names) or '(none)'}"


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """Raise ConfigError when `options` holds a keyword `factory` does not accept."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in options:
        if key not in params:
            raise ConfigError(unknown_name_message(f"option of {what}", key, sorted(params)))


def modality_names() -> list[str]:
    """Names registered in the `dmssl.modalities` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_modality(reference: str) -> type:
    """Resolve `image` (entry point) or `pkg.module:Class` to an adapter class."""
    from dmssl.modality import Modality

    if ":" in reference:
        module_name, _, class_name = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"modality={reference!r}: cannot import module {module_name!r} ({err}); run from the "
                              "folder that holds it, add that folder to PYTHONPATH, or pip install -e the package "
                              "(which may also register a short name in the dmssl.modalities entry-point group)") from None
        if not hasattr(module, class_name):
            raise ConfigError(f"modality={reference!r}: module {module_name!r} has no attribute {class_name!r}")
        adapter = getattr(module, class_name)
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == reference]
        if not matches:
            names = modality_names()
            raise ConfigError(
                unknown_name_message("modality", reference, names)
                + " (or give package.module:ClassName; is the package installed with pip install -e .?)"
            )
        try:
            adapter = matches[0].load()
        except ImportError as err:
            raise ConfigError(f"modality {reference!r} failed to import: {err}") from None
    if not (inspect.isclass(adapter) and issubclass(adapter, Modality)):
        raise ConfigError(
            f"modality={reference!r} is not an adapter: expected a subclass of dmssl.modality.Modality,"
            f" got {adapter!r}"
        )
    return adapter
