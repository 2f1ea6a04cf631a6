"""core/ and api/ stay device-neutral: no device SDK, no backend import, no device-string checks.

Every device-specific answer is a hook (ARCHITECTURE.md, "The plugin contract"). This test reads
the source with `ast`, so comments and docstrings may mention devices freely.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEUTRAL_DIRS = ("core", "api")

FORBIDDEN_MODULES = ("torch.cuda", "torch.hpu", "torch.xpu", "habana_frameworks", "torch_neuronx",
                     "torch_xla", "optimum.neuron", "optimum.habana", "triton", "tgserve.backends")
DEVICE_SUBMODULES = {"cuda", "hpu", "xpu"}  # torch.<name>
DEVICE_TYPE_NAMES = {"cuda", "hpu", "xla", "rocm", "mps", "xpu"}
IMPORT_FUNCTIONS = {"import_module", "__import__", "find_spec"}


def _is_forbidden(module: str) -> bool:
    return any(module == banned or module.startswith(banned + ".") for banned in FORBIDDEN_MODULES)


def _device_strings(node: ast.AST) -> list[str]:
    """Device type names among a compared operand: a string constant, or a tuple/list/set of them."""
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elements
            if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in DEVICE_TYPE_NAMES]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a from-import names, relative ones resolved against `package` (tgserve.core...)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def violations(source: str, package: str = "tgserve.core") -> list[str]:
    """Each forbidden construct in `source`, a module of `package`, as "line N: what"."""
    tree = ast.parse(source)
    torch_names = {"torch"}  # names bound to the torch module (import torch as t)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {alias.asname for alias in node.names if alias.name == "torch" and alias.asname}
    found = []
    for node in ast.walk(tree):
        where = f"line {node.lineno}" if hasattr(node, "lineno") else "?"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            candidates = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            found += [f"{where}: from-import of {name}" for name in candidates if _is_forbidden(name)]
        elif isinstance(node, ast.Attribute):
            if (isinstance(node.value, ast.Name) and node.value.id in torch_names
                    and node.attr in DEVICE_SUBMODULES):
                found.append(f"{where}: torch.{node.attr}")
        elif isinstance(node, ast.Compare):
            is_membership_or_equality = all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops)
            names = [s for operand in [node.left, *node.comparators] for s in _device_strings(operand)]
            if is_membership_or_equality and names:
                found.append(f"{where}: compares with device name {names[0]!r}")
        elif isinstance(node, ast.MatchValue):
            found += [f"{where}: match case {s!r}" for s in _device_strings(node.value)]
        elif isinstance(node, ast.Call):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0] if node.args else None
            if (function in IMPORT_FUNCTIONS and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and _is_forbidden(first.value)):
                found.append(f"{where}: {function}({first.value!r})")
    return found


def neutral_files() -> list[Path]:
    return sorted(path for folder in NEUTRAL_DIRS for path in (REPO / folder).rglob("*.py"))


def test_core_and_api_are_device_neutral():
    problems = []
    for path in neutral_files():
        package = ".".join(("tgserve", *path.relative_to(REPO).parent.parts))  # core/layers -> tgserve.core.layers
        problems += [f"{path.relative_to(REPO)} {v}" for v in violations(path.read_text(), package)]
    assert not problems, "device-specific code in core/ or api/ (make it a hook):\n" + "\n".join(problems)


def test_there_are_files_to_check():
    assert any(path.name == "hookspecs.py" for path in neutral_files())


@pytest.mark.parametrize("source", [
    "import torch.cuda",
    "import habana_frameworks.torch.core as htcore",
    "from torch_neuronx import trace",
    "from optimum.neuron import NeuronModelForCausalLM",
    "from optimum.habana.transformers import modeling_utils",
    "import triton.language as tl",
    "from tgserve.backends.cpu import plugin",
    "from tgserve import backends",
    "from ..backends.cuda import plugin",
    "from .. import backends",
    "from torch import cuda",
    "import importlib\nimportlib.import_module('tgserve.backends.cuda')",
    "import torch\ntorch.cuda.synchronize()",
    "import torch as t\nn = t.hpu.device_count()",
    "import torch\nx = torch.xpu",
    "if device.type == 'cuda': pass",
    "ok = 'hpu' != kind",
    "if device.type in ('cuda', 'xla'): pass",
    "if 'mps' in str(device): pass",
    "match kind:\n    case 'rocm':\n        pass",
])
def test_checker_catches(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    '"""Runs on cuda, hpu or xla through hooks."""',
    "import torch\nx = torch.zeros(3, device=device)",
    "from . import hookspecs",
    "from ..core import config",
    "name = 'cuda_memory_fraction'",
    "if dtype == 'bfloat16': pass",
    "device = torch.device(hook.tgserve_get_device(rank=0))",
])
def test_checker_allows(source):
    assert not violations(source), source
