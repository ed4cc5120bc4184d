"""Processes opening one SQLite file at once all get it in WAL mode, none "database is locked"."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.sqlite_wal import enable_write_ahead_log

OPENERS = 4  # at once, as the workers of one gateway open their shared files
ROUNDS = 150  # fresh files; without the retry about one round in twenty fails


def _open_at_once(path: Path) -> tuple[list[str], list[Exception]]:
    barrier = threading.Barrier(OPENERS)
    modes: list[str] = []
    failures: list[Exception] = []

    def open_it() -> None:
        connection = sqlite3.connect(path, timeout=2.0, isolation_level=None)
        barrier.wait()
        try:
            enable_write_ahead_log(connection, timeout_s=2.0)
            modes.append(connection.execute("PRAGMA journal_mode").fetchone()[0])
        except sqlite3.Error as error:
            failures.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=open_it) for _ in range(OPENERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return modes, failures


def test_openers_at_once_all_get_the_file_in_wal_mode(tmp_path: Path):
    for round_ in range(ROUNDS):
        modes, failures = _open_at_once(tmp_path / f"{round_}.sqlite")
        assert failures == []
        assert modes == ["wal"] * OPENERS


def test_a_lock_held_past_the_timeout_is_still_an_error(tmp_path: Path):
    """The retry is bounded: a reader that never lets go leaves the caller an error."""
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()
    opener = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_write_ahead_log(opener, timeout_s=0.05)
    finally:
        opener.close()
        holder.close()
