"""What a user deploys uses Flower through its public interfaces only.

The app's FAB (what `flwr run` ships, `fab-include` in pyproject.toml) imports from Flower only
names that Flower's API reference documents: the modules below, and in each only the names of
its `__all__`. Whatever patches Flower's runtime lives in `fgl_accel`, which no FAB file
imports and no FAB holds.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Flower's documented modules (the API reference of flwr 1.42)
PUBLIC = {
    "flwr.app",
    "flwr.clientapp",
    "flwr.clientapp.mod",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.client",
    "flwr.client.mod",
    "flwr.common",
    "flwr.server",
    "flwr.server.strategy",
    "flwr.server.workflow",
    "flwr.simulation",
}


def fab_files() -> list[Path]:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    return sorted({path for pattern in app["fab-include"] for path in ROOT.glob(pattern)})


def flower_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of each `import flwr...` / `from flwr... import` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("flwr")]
    return found


def not_public(module: str, names: list[str]) -> list[str]:
    if module not in PUBLIC:
        return [module]
    exported = set(importlib.import_module(module).__all__)
    return [f"{module}.{name}" for name in names if name not in exported]


def test_the_fab_holds_the_app_and_nothing_that_patches_flower():
    files = {p.relative_to(ROOT).parts[0] for p in fab_files()}
    assert files == {"fgl_core", "fgl_client", "fgl_server", "strategies"}


def test_no_file_of_the_fab_imports_flower_internals_or_fgl_accel():
    problems = []
    for path in fab_files():
        for line, module, names in flower_imports(path):
            problems += [
                f"{path.relative_to(ROOT)}:{line}: {bad}" for bad in not_public(module, names)
            ]
        text = path.read_text()
        if "fgl_accel" in text:
            problems.append(f"{path.relative_to(ROOT)}: names fgl_accel")
    assert problems == []


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from flwr.common.serde import message_to_proto", ["flwr.common.serde"]),
        ("from flwr.common import serde_helper, log", ["flwr.common.serde_helper"]),
        ("import flwr.supercore.superexec", ["flwr.supercore.superexec"]),
        ("from flwr.app import Message", []),
    ],
)
def test_the_check_tells_an_internal_import_from_a_public_one(tmp_path, source, bad):
    path = tmp_path / "app.py"
    path.write_text(source + "\n")
    found = [b for _, module, names in flower_imports(path) for b in not_public(module, names)]
    assert found == bad
