"""The body checks of gateway/body.py, one function at a time, without a server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.body import (
    check_declared_length,
    check_media_type,
    nesting_depth,
    parse_json,
    read_limited,
)
from gateway.problems import Problem

LIMIT = 1024


def nested_arrays(depth: int) -> Any:
    """`depth` levels of arrays, built without recursion."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "APPLICATION/JSON",
        "  application/json  ",
    ],
)
def test_json_media_types_are_accepted(content_type: str) -> None:
    """application/json, with any case, spacing or parameters, passes."""
    check_media_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "text/json",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/octet-stream",
        "application/jsonp",
        "application/json-seq",
        "application/merge-patch+json",  # edits to a document, not a prediction request
        "json",
        "*/*",
    ],
)
def test_other_media_types_are_refused_with_415(content_type: str | None) -> None:
    """Anything but a JSON body is refused with 415 and a hint."""
    with pytest.raises(Problem) as raised:
        check_media_type(content_type)
    assert raised.value.status == 415
    assert "application/json" in raised.value.detail


@pytest.mark.parametrize("content_length", [None, "0", "1", str(LIMIT)])
def test_declared_length_within_limit_passes(content_length: str | None) -> None:
    """No Content-Length, or one up to the limit, passes."""
    check_declared_length(content_length, LIMIT)


@pytest.mark.parametrize(
    ("content_length", "status"),
    [
        pytest.param(str(LIMIT + 1), 413, id="one-over"),
        pytest.param(str(20 * 1024 * 1024), 413, id="20MB"),
        pytest.param("9" * 40, 413, id="absurd"),
        pytest.param("abc", 400, id="letters"),
        pytest.param("", 400, id="empty"),
        pytest.param("1e3", 400, id="exponent"),
        pytest.param("12.5", 400, id="fraction"),
    ],
)
def test_declared_length_problems(content_length: str, status: int) -> None:
    """Too large a Content-Length is 413 before reading; a non-number is 400."""
    with pytest.raises(Problem) as raised:
        check_declared_length(content_length, LIMIT)
    assert raised.value.status == status


async def _chunks(*sizes: int) -> AsyncIterator[bytes]:
    for size in sizes:
        yield b"x" * size


@pytest.mark.parametrize("sizes", [(), (0,), (LIMIT,), (1, LIMIT - 1), (100,) * 10])
async def test_read_limited_returns_the_whole_body(sizes: tuple[int, ...]) -> None:
    """Bodies up to the limit come back whole, however they are chunked."""
    assert await read_limited(_chunks(*sizes), LIMIT) == b"x" * sum(sizes)


@pytest.mark.parametrize("sizes", [(LIMIT + 1,), (LIMIT, 1), (600, 600), (1,) * (LIMIT + 1)])
async def test_read_limited_stops_at_the_limit(sizes: tuple[int, ...]) -> None:
    """A body passing the limit is 413, even when no single chunk is too big."""
    with pytest.raises(Problem) as raised:
        await read_limited(_chunks(*sizes), LIMIT)
    assert raised.value.status == 413


async def test_read_limited_does_not_drain_an_endless_body() -> None:
    """read_limited stops pulling chunks once the limit is passed."""
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 100

    with pytest.raises(Problem):
        await read_limited(endless(), LIMIT)
    assert pulled == LIMIT // 100 + 1


@pytest.mark.parametrize(
    ("value", "depth"),
    [
        pytest.param(1, 0, id="number"),
        pytest.param("x", 0, id="string"),
        pytest.param(None, 0, id="null"),
        pytest.param({}, 1, id="empty-object"),
        pytest.param([], 1, id="empty-array"),
        pytest.param({"a": 1, "b": "x"}, 1, id="flat-object"),
        pytest.param([[]], 2, id="array-in-array"),
        pytest.param({"a": {"b": [1]}}, 3, id="mixed"),
        pytest.param([1, [2, [3]]], 3, id="deepest-last"),
        pytest.param([[[[]]], 1], 4, id="deepest-first"),
        pytest.param({"a": [], "b": [[[]]], "c": {}}, 4, id="deepest-in-middle"),
        pytest.param(nested_arrays(33), 33, id="33-levels"),
    ],
)
def test_nesting_depth(value: Any, depth: int) -> None:
    """nesting_depth counts container levels; scalars are depth 0."""
    assert nesting_depth(value, 1000) == depth


def test_nesting_depth_stops_counting_past_the_limit() -> None:
    """Past `stop_above` the count stops early but still reports more than the limit."""
    depth = nesting_depth(nested_arrays(500), 10)
    assert 10 < depth < 500


def test_nesting_depth_handles_very_deep_values_without_recursion() -> None:
    """100,000 levels are measured without hitting Python's recursion limit."""
    assert nesting_depth(nested_arrays(100_000), 1_000_000) == 100_000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"{}", {}, id="empty-object"),
        pytest.param(
            b'{"a": [1, 2.5, "x", null, true]}', {"a": [1, 2.5, "x", None, True]}, id="all"
        ),
        pytest.param('{"name": "Zoë"}'.encode(), {"name": "Zoë"}, id="utf8"),
        pytest.param(b"  [1]\n", [1], id="whitespace"),
        pytest.param(b"[" * 32 + b"]" * 32, nested_arrays(32), id="at-depth-limit"),
        pytest.param(b'{"a": "b:c", "d": {"a": 1}}', {"a": "b:c", "d": {"a": 1}}, id="colons"),
    ],
)
def test_parse_json_accepts_strict_json(body: bytes, expected: Any) -> None:
    """Strict JSON up to the depth limit parses to plain data."""
    assert parse_json(body, 32) == expected


@pytest.mark.parametrize(
    ("body", "title", "detail"),
    [
        pytest.param(b"", "Malformed JSON", "empty", id="empty"),
        pytest.param(b'{"a": ', "Malformed JSON", "not valid JSON at byte", id="truncated"),
        pytest.param(b"{'a': 1}", "Malformed JSON", "not valid JSON", id="single-quotes"),
        pytest.param(b'{"a": 1,}', "Malformed JSON", "not valid JSON", id="trailing-comma"),
        pytest.param(b'{"a": NaN}', "Malformed JSON", "NaN and Infinity", id="nan"),
        pytest.param(b'{"a": Infinity}', "Malformed JSON", "NaN and Infinity", id="infinity"),
        pytest.param(b'{"a": -Infinity}', "Malformed JSON", "NaN and Infinity", id="-infinity"),
        pytest.param(b"[1e400]", "Malformed JSON", "not valid JSON", id="overflowing-number"),
        pytest.param(b'{"a": "\xff"}', "Malformed JSON", "not valid UTF-8", id="invalid-utf8"),
        pytest.param(b'"\xed\xa0\x80"', "Malformed JSON", "not valid UTF-8", id="utf8-surrogate"),
        pytest.param('{"a": 1}'.encode("utf-16"), "Malformed JSON", "UTF-8", id="utf16-bom"),
        pytest.param(
            b"[" * 33 + b"]" * 33, "JSON nested too deeply", "deeper than 32", id="past-depth-limit"
        ),
        pytest.param(b'{"a":1,"a":2}', "Duplicate JSON key", "'a'", id="duplicate"),
        pytest.param(b'{"a" :1,"a":2}', "Duplicate JSON key", "'a'", id="duplicate-spaced"),
        pytest.param(b'{"b":{"a":":","a":2}}', "Duplicate JSON key", "'a'", id="duplicate-nested"),
        # Past orjson's own limit (1024) the parser refuses before the depth check can run.
        pytest.param(b"[" * 5000 + b"]" * 5000, "Malformed JSON", "nests too deeply", id="5000"),
        pytest.param(
            b'{"a":' * 5000 + b"1" + b"}" * 5000,
            "Malformed JSON",
            "nests too deeply",
            id="5000-objects",
        ),
    ],
)
def test_parse_json_errors_say_what_is_wrong(body: bytes, title: str, detail: str) -> None:
    """Each kind of bad body is a 400 whose title and detail say what is wrong with it."""
    with pytest.raises(Problem) as raised:
        parse_json(body, 32)
    problem = raised.value
    assert problem.status == 400
    assert problem.slug == "malformed-json"
    assert problem.title == title
    assert detail in problem.detail, problem.detail
    assert len(problem.detail) < 200  # never echoes the caller's bytes at length
