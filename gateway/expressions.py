"""CEL conditions, compiled and checked once at load so they can never fail a request.

Rules in `fallbacks/` and routes in `policies/` are both CEL boolean conditions. Each is
compiled, limited to the variables its place allows, and tried on a sample input shaped
like the real one, so a syntax error, a misspelt variable or a type mismatch is reported
at load with the CEL position, never at request time.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import cel

# CEL's comprehension macros: each runs its body once per element of a list or map.
_MACRO_CALL = re.compile(r"\.\s*(all|exists|exists_one|map|filter)\s*\(")
_MACRO_BINDING = re.compile(
    r"\.\s*(all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,"
)
# Comprehensions nested deeper than this are refused. Nesting multiplies: seven levels over
# ten-element lists are ten million evaluations, seconds during which the cel binding holds
# the GIL and the whole gateway (event loop included) stands still, at load and on every
# request. Two levels (a list of lists checked element by element) is as deep as a routing or
# fallback condition has reason to go; no shipped or tested condition uses more than one.
MAX_COMPREHENSION_DEPTH = 2
# Quoted strings, whose text may look like a macro call: triple-quoted first, then single.
_STRING_LITERAL = re.compile(
    "(?s)'''.*?'''" + r'|""".*?"""' + r"|'(?:\\.|[^'\\])*'" + r'|"(?:\\.|[^"\\])*"'
)

# A representative value per JSON Schema type, for checking conditions at load.
_SAMPLE_VALUES: dict[str, Any] = {"string": "sample", "integer": 1, "number": 1.5, "boolean": True}


def sample_features(feature_types: Mapping[str, str]) -> dict[str, Any]:
    """A feature mapping with one plausible value per declared feature."""
    return {name: _SAMPLE_VALUES.get(kind, "sample") for name, kind in feature_types.items()}


def compile_condition(source: str, allowed: Collection[str], sample: Mapping[str, Any]) -> Any:
    """A compiled CEL program that is a boolean on `sample`; ValueError says what is wrong."""
    depth = comprehension_depth(source)
    if depth > MAX_COMPREHENSION_DEPTH:
        raise ValueError(
            f"nests comprehensions (all, exists, exists_one, map, filter) {depth} deep; "
            f"at most {MAX_COMPREHENSION_DEPTH}, as each level multiplies the work per request"
        )
    try:
        program = cel.compile(source)
    except ValueError as error:
        raise ValueError(f"does not compile: {one_line(error)}") from None
    # The cel binding lists a macro's iteration variable (`x` in `l.exists(x, x > 2)`) among
    # the expression's variables; it is bound by the macro, not looked up in the context.
    bound = iteration_variables(source)
    unknown = [v for v in program.variables() if v not in allowed and v not in bound]
    if unknown:
        raise ValueError(f"refers to unknown variables: {', '.join(unknown)}")
    try:
        result = program.execute(dict(sample))
    # Any exception (see `holds`): the condition fails on a valid input, whatever CEL raised.
    except Exception as error:
        raise ValueError(f"fails on a valid input: {one_line(error)}") from None
    if not isinstance(result, bool):
        raise ValueError(f"must be a boolean condition, gives {type(result).__name__}")
    return program


def holds(program: Any, context: Mapping[str, Any]) -> bool:
    """Whether a checked condition is true for `context`; an error at run time means false."""
    try:
        return program.execute(context) is True
    # Every exception, not a list: the cel binding's set is open (ZeroDivisionError,
    # OverflowError, IndexError... besides TypeError and KeyError), and a condition that
    # cannot be evaluated for one request must leave the chain to its next step, never fail it.
    except Exception:
        return False


def iteration_variables(source: str) -> set[str]:
    """The names comprehension macros bind in `source` (their first argument)."""
    code = _STRING_LITERAL.sub(lambda m: " " * len(m.group(0)), source)
    return {match.group(2) for match in _MACRO_BINDING.finditer(code)}


def comprehension_depth(source: str) -> int:
    """How deeply comprehension macros nest in `source`: 0 for none, 2 for `.all()` inside
    `.all()`. Read from the text, string literals left out, so it is known before CEL runs."""
    code = _STRING_LITERAL.sub(lambda m: " " * len(m.group(0)), source)
    macro_parentheses = {match.end() - 1 for match in _MACRO_CALL.finditer(code)}
    deepest = 0
    frames: list[bool] = []  # per open parenthesis: whether it opens a macro's arguments
    for index, char in enumerate(code):
        if char == "(":
            frames.append(index in macro_parentheses)
            deepest = max(deepest, sum(frames))
        elif char == ")" and frames:
            frames.pop()
    return deepest


def one_line(error: Exception) -> str:
    """CEL's message on one line: it carries the position as `<input>:line:column`."""
    return " ".join(str(error).split())
