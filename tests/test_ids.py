"""Random identifiers: valid version-4 UUIDs, unique, and never repeated by a forked child."""

from __future__ import annotations

import os
import uuid

import pytest

from gateway.ids import is_prediction_id, new_hex_id, new_uuid4

MANY = 20_000  # more than one 4 KiB buffer's worth (256 ids)


def test_ids_are_canonical_version_4_uuids():
    for _ in range(1_000):
        text = new_uuid4()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_hex_ids_are_version_4_uuids_as_32_hex_digits():
    raw = new_hex_id()
    assert isinstance(raw, bytes) and len(raw) == 32
    parsed = uuid.UUID(hex=raw.decode())
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat_across_buffer_refills():
    assert len({new_uuid4() for _ in range(MANY)}) == MANY


def test_a_forked_child_does_not_repeat_its_parents_next_ids():
    new_uuid4()  # the buffer is filled and partly used
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(reader)
        os.write(writer, ",".join(new_uuid4() for _ in range(10)).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {new_uuid4() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e\n", False),  # `$` would let it through
        ("0F8FAD5B-D9CB-469F-A165-70867728950E", False),  # the gateway writes lower case
        ("0f8fad5b-d9cb-469f-a165-70867728950", False),
        ("0f8fad5bd9cb469fa16570867728950e", False),
        ("", False),
    ],
)
def test_a_prediction_id_is_exactly_the_shape_the_gateway_gives(value, expected):
    assert is_prediction_id(value) is expected
