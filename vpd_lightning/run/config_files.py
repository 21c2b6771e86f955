"""YAML read within a budget: config files and every value jsonargparse parses as YAML.

YAML aliases let a few hundred bytes name an exponential tree (nested anchors: "billion
laughs"); PyYAML shares the aliased objects, but jsonargparse copies and dumps the tree whole.
So before anything is constructed, the text is at most `MAX_CONFIG_BYTES`, and its node graph,
composed (aliases unexpanded) and walked once, expands to at most `MAX_EXPANDED_NODES` nodes
and `MAX_EXPANDED_CHARS` characters of scalars, with no alias that contains itself. A config
file is checked from its size before it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

from vpd_lightning.errors import UserInputError

MAX_CONFIG_BYTES = 2**20  # a full config is about 3 KB
MAX_EXPANDED_NODES = 100_000
MAX_EXPANDED_CHARS = 4 * MAX_CONFIG_BYTES
BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_config_text(path: str | Path) -> str:
    """The text of config file `path`, checked by size before it is read and by
    `check_yaml_budget` after."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"--config {path}: no such file")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserInputError(
            f"--config {path}: {size} bytes, more than the {MAX_CONFIG_BYTES} a config file may "
            "hold (a full config is a few KB); give the run's config, not a data file"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"--config {path}: not valid YAML (not UTF-8 text)") from None
    check_yaml_budget(text, f"--config {path}")
    return text


def check_yaml_budget(text: str, where: str) -> None:
    """`text` is at most `MAX_CONFIG_BYTES` and, aliases expanded, at most `MAX_EXPANDED_NODES`
    nodes and `MAX_EXPANDED_CHARS` characters; measured on the composed graph, in its size."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UserInputError(
            f"{where}: {len(text)} characters of YAML, more than the {MAX_CONFIG_BYTES} accepted"
        )
    if "&" not in text and "*" not in text and "<<" not in text:
        return  # no anchor, alias or merge: the text is its own expansion
    loader = BaseLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError:
        return  # not YAML: the caller's own parse reports it
    finally:
        loader.dispose()
    if root is not None:
        nodes, chars = expanded_size(root, where)
        if nodes > MAX_EXPANDED_NODES or chars > MAX_EXPANDED_CHARS:
            raise UserInputError(
                f"{where}: its aliases expand to {nodes} nodes and {chars} characters, more than "
                f"the {MAX_EXPANDED_NODES} nodes and {MAX_EXPANDED_CHARS} characters accepted "
                "(nested anchors: a YAML bomb); write the values out"
            )


def expanded_size(root: yaml.Node, where: str) -> tuple[int, int]:
    """(nodes, scalar characters) of the tree `root` names with every alias expanded: each node
    of the graph is visited once and its size memoised, so this costs the graph's size."""
    sizes: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = (1, len(node.value))
            continue
        children = (
            [item for pair in node.value for item in pair]
            if isinstance(node, yaml.MappingNode)
            else list(node.value)
        )
        if children_done:
            on_path.discard(id(node))
            nodes = 1 + sum(sizes[id(c)][0] for c in children)
            chars = sum(sizes[id(c)][1] for c in children)
            sizes[id(node)] = (min(nodes, 2**62), min(chars, 2**62))
            continue
        if id(node) in on_path:
            raise UserInputError(f"{where}: an alias contains itself (a recursive YAML anchor)")
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise UserInputError(f"{where}: an alias contains itself (a recursive YAML anchor)")
            stack.append((child, False))
    return sizes[id(root)]


def bound_jsonargparse_yaml() -> None:
    """Make jsonargparse's YAML loader (config files, nested config files and command-line
    values) check `check_yaml_budget` first (idempotent)."""
    loader = get_loader("yaml")
    if getattr(loader, "bounded", False):
        return
    set_loader("yaml", _bounded(loader), exceptions=(yaml.YAMLError,))


def _bounded(loader: Callable[[str], Any]) -> Callable[[str], Any]:
    def bounded_yaml_load(text: str) -> Any:
        check_yaml_budget(text, "a YAML value")
        return loader(text)

    bounded_yaml_load.bounded = True  # type: ignore[attr-defined]
    return bounded_yaml_load
