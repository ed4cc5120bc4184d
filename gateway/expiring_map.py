"""A map that forgets: at most `limit` entries, none older than `keep_s`.

What the gateway remembers per request for a while (a job's outcome for polling, the claim of
an idempotency key) must not grow with traffic. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    """Entries kept `keep_s` from when they were put, the oldest dropped beyond `limit`."""

    def __init__(self, limit: int, keep_s: float) -> None:
        self._limit = limit
        self._keep_s = keep_s
        # Insertion order is expiry order (one keep_s for all): the oldest is always first.
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: K, value: V, now: float) -> None:
        self._entries[key] = (now + self._keep_s, value)
        self._entries.move_to_end(key)
        self._expire(now)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def get(self, key: K, now: float) -> V | None:
        self._expire(now)
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]

    def _expire(self, now: float) -> None:
        while self._entries:
            expires, _ = next(iter(self._entries.values()))
            if expires > now:
                return
            self._entries.popitem(last=False)
