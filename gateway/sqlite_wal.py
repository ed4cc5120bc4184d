"""Opening an SQLite file in write-ahead-log mode when other processes may open it at once.

Switching a file to WAL takes a lock that SQLite does not wait for: its busy timeout does not
apply, so a second process opening the file at that moment gets "database is locked" at once.
Workers of one gateway start together and open their shared files together, so the switch is
retried (it is a no-op once the file is in WAL mode) until the connection's own timeout.
"""

from __future__ import annotations

import sqlite3
import time

_RETRY_PAUSE_S = 0.005


def enable_write_ahead_log(connection: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file of `connection` in WAL mode, retrying while another opener holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE_S)
