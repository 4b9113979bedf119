"""Name -> factory registries: objectives, pseudo-labellers, distances and kernels register here.

`Registry` is a dict with two manners: registering a name twice is an error (not a silent overwrite),
and looking up an unknown name says which names exist and which one was probably meant. (Modality
adapters are found differently, by entry point or `module:Class`: see `dmssl.modality.load_modality`.)
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dmssl.errors import ConfigError

T = TypeVar("T")


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
