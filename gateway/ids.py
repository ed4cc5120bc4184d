"""Random identifiers for predictions and requests: UUID version 4, made cheaply.

`uuid.uuid4()` makes one getrandom(2) call and a `UUID` object per id, and every request needs
two ids (its request id and its prediction id): 7-10 µs on the benchmark VM, about 3% of a
cache hit. Here the operating system's randomness is read 4 KiB at a time and each id takes
the next 16 bytes, sets the version and variant bits, and is formatted straight to text. The
bytes come from `os.urandom`, as uuid4's do, so ids stay unguessable. A forked child
starts with a fresh buffer, so it never repeats its parent's ids.
"""

from __future__ import annotations

import os
import re

_ID_BYTES = 16
_BUFFER_BYTES = 4096


class _RandomBytes:
    """The next 16 random bytes, from a buffer refilled from the OS when used up."""

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def take(self) -> bytearray:
        if self._offset + _ID_BYTES > len(self._buffer):
            self._buffer = os.urandom(_BUFFER_BYTES)
            self._offset = 0
        start = self._offset
        self._offset = start + _ID_BYTES
        return bytearray(self._buffer[start : start + _ID_BYTES])

    def forget(self) -> None:
        self._buffer = b""
        self._offset = 0


_random = _RandomBytes()
os.register_at_fork(after_in_child=_random.forget)


def _uuid4_bytes() -> bytearray:
    raw = _random.take()
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return raw


def new_uuid4() -> str:
    """A random UUID in its canonical form, `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`."""
    h = _uuid4_bytes().hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_hex_id() -> bytes:
    """A random UUID as 32 hex digits (ASCII bytes), as `uuid.uuid4().hex` gives it."""
    return _uuid4_bytes().hex().encode()


_PREDICTION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_prediction_id(value: str) -> bool:
    """Shaped as the ids this gateway gives (lower-case UUID text), and nothing more: a
    trailing newline, which `$` would let through, is not."""
    return _PREDICTION_ID.fullmatch(value) is not None
