"""The config tree as plain data: YAML files with `_base_` inheritance, dotted keys (`train.lr=2e-4`) written into
the tree, and flattening for MLflow params. No schema here: `dcdit_platform.config.experiment` checks the tree.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dcdit.errors import DCDiTError

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; configs are full of such numbers, so read them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


MAX_YAML_VALUES = 100_000  # values a config may hold once its aliases are expanded (a real one holds ~100)


def parse_yaml(text: str, where: str = "<string>") -> Any:
    """Safe YAML (numbers like 1e-4 read as floats) whose aliases may not expand past MAX_YAML_VALUES values:
    a few lines of nested aliases (a "billion laughs") would otherwise fill memory wherever the tree is walked."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DCDiTError(f"cannot parse {where}{at}: {problem}") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Count the values of the tree as aliases expand it (shared nodes counted once per use, never built)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise DCDiTError(f"{where}: a YAML alias refers to itself; configs are trees")
        visiting.add(key)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise DCDiTError(f"{where}: its YAML aliases expand to more than {MAX_YAML_VALUES} values; a config "
                                 "holds a few hundred, so write it out without nested aliases")
        visiting.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its `_base_` file(s) merged underneath (paths relative to the including file)."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise DCDiTError(f"config inheritance loops: {chain}")
    if not path.is_file():
        raise DCDiTError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DCDiTError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        if not isinstance(base, str):
            raise DCDiTError(f"{path}: _base_ must be a file name or a list of them, got {base!r}")
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are YAML (`train.betas=[0.9,0.95]`, `train.init_from=null`)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise DCDiTError(f"override {item!r} must look like section.key=value (e.g. train.lr=2e-4)")
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
        set_dotted(out, key, value, where=f"override {key}")
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any, *, where: str | None = None) -> dict[str, Any]:
    """Set `a.b.c` in a nested config dict (in place); `model: DC-DiT-B` becomes {preset: DC-DiT-B} when a model
    field is set below it. The one dotted-key writer: command-line overrides and sweeps both use it."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            if depth == 0 and part == "model" and isinstance(child, str):
                child = node[part] = {"preset": child}
            else:
                raise DCDiTError(f"{where or key}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return tree


def defining_file(path: Path, key: str, _depth: int = 0) -> Path | None:
    """The file of a `_base_` chain whose own YAML sets top-level `key` (the last base wins, as in the merge)."""
    if _depth > 16 or not path.is_file():
        return None
    data = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        return None
    if key in data:
        return path
    bases = data.get("_base_") or []
    for base in reversed([bases] if isinstance(bases, str) else list(bases)):
        found = defining_file(path.parent / str(base), key, _depth + 1)
        if found:
            return found
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


__all__ = ["parse_yaml", "load_yaml_tree", "deep_merge", "apply_overrides", "set_dotted", "defining_file",
           "flatten"]
