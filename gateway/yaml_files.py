"""Reading operator-edited YAML without surprises: what a file says is what loads.

`yaml.safe_load` is safe from code execution, not from surprises. Here a repeated key is an
error instead of the last one silently winning (a second `weight:` would move all traffic),
nesting is bounded (PyYAML composes recursively: ten thousand `[` end in RecursionError),
and so is the size of the document once aliases are followed (ten aliases of ten aliases...
of a list is a few KB of text and billions of values: an "alias bomb"). Each refusal is a
`yaml.MarkedYAMLError`, so callers report it as any YAML error, with its line and column.

Aliases themselves stay: the shipped policies share a breaker as `breaker: *breaker` and
override a field as `{<<: *breaker, force: open}`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# Policies nest about eight levels, OpenAPI contracts about twenty; PyYAML overflows the
# Python stack at a few hundred.
MAX_DEPTH = 64
# Values after following aliases. A policy holds a few hundred; a hundred thousand is still
# read, expanded and validated in well under a second.
MAX_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(text: str, max_values: int | None = MAX_VALUES) -> Any:
    """The one YAML document in `text`, or a `yaml.YAMLError` with the line at fault.

    `max_values` bounds the values once aliases are followed (None: only by the text's size,
    for files that are not reloaded while serving)."""
    loader = _OperatorLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _ExpandedSize(max_values).check(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _OperatorLoader(yaml.SafeLoader):
    """SafeLoader with bounded nesting and no repeated keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self._depth >= MAX_DEPTH:
            raise ComposerError(
                None, None, f"nested too deeply (more than {MAX_DEPTH} levels)",
                self.peek_event().start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_repeated_keys(self, node)
        return super().construct_mapping(node, deep)


def _refuse_repeated_keys(loader: yaml.SafeLoader, node: MappingNode) -> None:
    """A key written twice in one mapping is an error. Keys a merge (`<<: *anchor`) brings
    in are not counted: overriding them is what a merge is for."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
            continue  # a non-scalar key is refused by the constructor itself
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConstructorError(
                "while reading a mapping", node.start_mark,
                f"key {key!r} appears twice", key_node.start_mark,
            )  # fmt: skip
        seen.add(key)


class _ExpandedSize:
    """Counts the values of a composed document as if every alias were copied out, and
    refuses it past the bound or when an alias contains itself.

    An anchor is always defined before its aliases, so walking in document order finds each
    aliased node counted already: the walk is linear in the text, however large the count."""

    def __init__(self, max_values: int | None) -> None:
        self.max_values = max_values
        self._counts: dict[int, tuple[int, int]] = {}  # id(node): (values, depth)
        self._open: set[int] = set()

    def check(self, node: Node) -> None:
        self._count(node)

    def _count(self, node: Node) -> tuple[int, int]:
        known = self._counts.get(id(node))
        if known is not None:
            return known
        if id(node) in self._open:
            raise ComposerError(None, None, "an alias refers to itself", node.start_mark)
        self._open.add(id(node))
        values, depth = 1, 1
        for child in _children(node):
            child_values, child_depth = self._count(child)
            values, depth = values + child_values, max(depth, child_depth + 1)
        self._open.discard(id(node))
        self._refuse_beyond_bounds(node, values, depth)
        self._counts[id(node)] = (values, depth)
        return values, depth

    def _refuse_beyond_bounds(self, node: Node, values: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            problem = f"nested too deeply once aliases are followed (more than {MAX_DEPTH} levels)"
            raise ComposerError(None, None, problem, node.start_mark)
        if self.max_values is not None and values > self.max_values:
            problem = f"more than {self.max_values} values once aliases are followed"
            raise ComposerError(None, None, problem, node.start_mark)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []
