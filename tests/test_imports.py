"""The import structure of both packages: every module imports on its own in a fresh interpreter, `dcdit` never
imports the platform or its services, and neither package has an import cycle (function-level imports included).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dcdit": ROOT / "dcdit", "dcdit_platform": ROOT / "platform" / "dcdit_platform"}
# What the model library must never import: it is usable and testable as plain PyTorch.
FORBIDDEN_IN_DCDIT = ("ray", "mlflow", "s3fs", "dcdit_platform")


def modules_of(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute names of everything `module` imports, at any depth of its code (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (`from a import b` counts a.b when b is a module)."""
    modules = modules_of(package)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_sees_direct_and_indirect_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_relative_and_function_level_imports_are_in_the_graph(tmp_path):
    source = "from . import sibling\n\ndef f():\n    from .other import thing\n    import pkg.third\n"
    (tmp_path / "mod.py").write_text(source)
    names = imported_names(tmp_path / "mod.py", "pkg.mod")
    assert {"pkg", "pkg.sibling", "pkg.other", "pkg.other.thing", "pkg.third"} <= names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle)}"


def test_the_model_library_imports_no_platform_or_services():
    offenders = []
    for module, path in modules_of("dcdit").items():
        for name in imported_names(path, module):
            if name.split(".")[0] in FORBIDDEN_IN_DCDIT:
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """A fork server pre-imports the heavy third-party libraries once; each child then imports one of our modules
    first, so an order-dependent import (a cycle that only works when something else was imported before) fails."""
    modules = sorted(modules_of("dcdit")) + sorted(modules_of("dcdit_platform"))
    script = r"""
import importlib, os, sys, traceback
import numpy, torch, ray, mlflow, pyarrow, diffusers  # third-party only: never one of ours
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last == "FAILED:", f"{last}\n{done.stderr[-3000:]}"
    assert len(modules) > 40  # both packages were found
