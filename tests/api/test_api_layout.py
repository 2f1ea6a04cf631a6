"""api/'s layout: the TGI half and the OpenAI half never import each other; the shared HTTP layer
imports neither. Only the composition modules at api/'s top (app, server, cli) see both halves.

Reads the source with `ast` (as tests/test_no_device_sdk_in_core.py does), so the rule holds for
imports inside functions too, and no module needs to be importable for the test to run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "api"
# package under api/ -> the api packages its modules must not import
FORBIDDEN = {"tgi": ("openai",), "openai": ("tgi",), "shared": ("tgi", "openai")}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`; relative imports are not used in api/."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: relative import"
            module = node.module or ""
            found += [(node.lineno, module)]
            if module == "tgserve.api":  # `from tgserve.api import tgi` names the subpackage
                found += [(node.lineno, f"tgserve.api.{alias.name}") for alias in node.names]
    return found


def violations(source: str, package: str) -> list[str]:
    """Each import in `source` (a module of api/`package`) of an api package it must not use."""
    banned = [f"tgserve.api.{name}" for name in FORBIDDEN[package]]
    return [f"line {line}: {module}" for line, module in imported_modules(source)
            if any(module == b or module.startswith(b + ".") for b in banned)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_sideways_imports(package: str):
    modules = sorted((API / package).rglob("*.py"))
    assert len(modules) > 3, f"api/{package} should hold its modules"
    bad = {str(p.relative_to(API)): v for p in modules if (v := violations(p.read_text(), package))}
    assert not bad, f"api/{package} imports a sibling half: {bad}"


def test_api_top_level_holds_only_composition_and_entry_points():
    """New route or helper modules go into tgi/, openai/ or shared/, not back into a flat api/."""
    top = {p.name for p in API.glob("*.py")}
    assert top == {"__init__.py", "app.py", "cli.py", "cli_flags.py", "logging_setup.py", "server.py"}


def test_the_checker_sees_a_sideways_import():
    """The rule catches each spelling of an import of the other half."""
    assert violations("from tgserve.api.openai.chat import x\n", "tgi") == ["line 1: tgserve.api.openai.chat"]
    assert violations("import tgserve.api.tgi.routes\n", "openai") == ["line 1: tgserve.api.tgi.routes"]
    assert violations("def f():\n    from tgserve.api import tgi\n", "shared") == ["line 2: tgserve.api.tgi"]
    assert violations("from tgserve.api.shared.errors import ApiError\n", "tgi") == []
