"""Random identifiers: valid version-4 UUIDs, unique, and never repeated by a forked child."""

from __future__ import annotations

import os
import uuid

from gateway.ids import new_hex_id, new_uuid4

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
