"""Which predictions already have an outcome, across the workers of one gateway.

Feedback is one outcome per prediction: a second one is refused (409). A worker remembers
what it judged itself (experiments.py), but feedback may reach any worker, and a caller that
retries after a lost answer may reach another one. So the workers of one
`aigw serve --workers N` also mark each judged prediction in one SQLite file of the workers'
directory: the insert that finds the id already there is the duplicate, whichever worker
judged first. The file keeps the latest `keep` ids (as a worker's own memory does).

SQLite is called in a thread, never on the event loop, over one connection per thread. If
the file cannot be used (a full disk, a lock held past its timeout), the worker's own memory
stands in and the failure is logged: a duplicate across workers may then be counted twice,
feedback is never refused for it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

from gateway.sqlite_wal import enable_write_ahead_log

log = logging.getLogger("gateway.feedback")

KEEP = 100_000  # as many as a worker's ledger of recent answers
TRIM_EVERY = 1_000  # inserts (by this worker) between trims of the oldest ids
_SCHEMA = "CREATE TABLE IF NOT EXISTS judged (id TEXT NOT NULL UNIQUE)"


class JudgedPredictions:
    """The shared mark of judged predictions, in `directory/judged.sqlite`."""

    def __init__(
        self, directory: Path, keep: int = KEEP, trim_every: int = TRIM_EVERY,
        timeout_s: float = 2.0,
    ) -> None:  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "judged.sqlite"
        self.keep = keep
        self._trim_every = trim_every
        self._timeout_s = timeout_s
        self._inserted = 0
        self._local = threading.local()
        self.errors = 0

    async def first_time(self, prediction_id: str) -> bool | None:
        """True when no worker judged `prediction_id` before (it is now marked), False when
        one did, None when the file could not tell (the caller's own memory decides)."""
        try:
            return await asyncio.to_thread(self._mark, prediction_id)
        except sqlite3.Error as error:
            self.errors += 1
            log.warning("judged predictions unavailable", extra={"error": repr(error)})
            return None

    async def release(self, prediction_id: str) -> None:
        """Undo a mark whose outcome was not counted after all (best effort: logged)."""
        try:
            await asyncio.to_thread(self._unmark, prediction_id)
        except sqlite3.Error as error:
            self.errors += 1
            log.warning("judged mark not released", extra={"error": repr(error)})

    def _unmark(self, prediction_id: str) -> None:
        self._connection().execute("DELETE FROM judged WHERE id = ?", (prediction_id,))

    def _mark(self, prediction_id: str) -> bool:
        connection = self._connection()
        try:
            inserted = connection.execute(
                "INSERT OR IGNORE INTO judged (id) VALUES (?)", (prediction_id,)
            ).rowcount
            self._inserted += inserted
            if inserted and self._inserted % self._trim_every == 0:
                connection.execute(
                    "DELETE FROM judged WHERE rowid <= (SELECT max(rowid) FROM judged) - ?",
                    (self.keep,),
                )
        except sqlite3.Error:
            self._local.__dict__.pop("connection", None)  # open afresh next time
            connection.close()
            raise
        return inserted == 1

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 binds one to its thread), opened on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
            try:
                # The file lives as long as the workers' run: no fsync per mark (an OS crash
                # ends the run anyway), and readers never wait for the writer (WAL).
                enable_write_ahead_log(connection, self._timeout_s)
                connection.execute("PRAGMA synchronous=OFF")
                connection.execute(_SCHEMA)
            except sqlite3.Error:
                connection.close()
                raise
            self._local.connection = connection
        return connection
