"""What reading a run folder or an export may import: nothing it names, unless the user says so.

A folder's `config.yaml` can name Python modules: `plugins: [...]` (imported to register methods) and a
`modality.name` of the form `package.module:Class`. Importing a module runs its code, so a folder someone
shared could run anything on `dmssl.load`, `dmssl predict` or `dmssl export`, and safetensors weights and
`torch.load(weights_only=True)` would promise nothing. So a folder's modules are imported only when

- the module is already imported in this process (the user's own code did it), or
- the user trusts the folder: `dmssl.load(path, trust_plugins=True)` / `--trust-plugins`, or names the
  modules they allow: `trust_plugins=["mypkg.losses"]`.

Built-in and installed adapters (the `dmssl.modalities` entry points: `image`, `text`, `audio`, and any that a
package installed with pip registers) are code the user installed, and load without asking.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmssl.errors import UntrustedCode

TrustPlugins = bool | Sequence[str]


def modules_named_by(tree: dict[str, Any]) -> list[str]:
    """The modules a saved config would import: its plugins and a `module:Class` modality's module."""
    plugins = tree.get("plugins") or []
    names = [str(p) for p in plugins] if isinstance(plugins, list) else [str(plugins)]
    modality = str((tree.get("modality") or {}).get("name", "image")) if isinstance(tree.get("modality"), dict) else ""
    if ":" in modality:
        names.append(modality.partition(":")[0])
    return names


def check_trusted(tree: dict[str, Any], source: str, trust: TrustPlugins) -> None:
    """Refuse, before any import, a saved config that names modules the user has not allowed."""
    if trust is True:
        return
    allowed = set() if trust is False else {str(m) for m in trust}
    foreign = [m for m in modules_named_by(tree) if m not in sys.modules and m not in allowed]
    if foreign:
        shown = ", ".join(repr(m) for m in foreign)
        raise UntrustedCode(
            f"{source} names Python modules that loading it would import, running their code: {shown}. If you "
            f"trust where it came from, allow them: dmssl.load(..., trust_plugins=True) or --trust-plugins "
            f"(or trust_plugins=[{shown}]); otherwise install or import the adapter and plugins yourself first")


def check_not_on_import_path(folder: Path) -> None:
    """A folder on Python's import path with Python files in it (`dmssl.load(".")` from inside a shared
    export) could shadow the modules dmssl imports next: refuse, and say to load it from elsewhere."""
    resolved = folder.resolve()
    if not any(Path(entry or ".").resolve() == resolved for entry in sys.path):
        return
    code = sorted(p.name for p in resolved.glob("*.py")) + sorted(
        p.name for p in resolved.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    if code:
        raise UntrustedCode(
            f"{str(folder)!r} is on Python's import path and holds Python code ({', '.join(code[:3])}), which the "
            "next import could run instead of dmssl's own modules; load it from another folder "
            f"(dmssl.load('path/to/{resolved.name}'))")
