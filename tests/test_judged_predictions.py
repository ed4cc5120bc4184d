"""One outcome per prediction across workers: the judged mark in the workers' SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from gateway.judged_predictions import JudgedPredictions


async def test_the_first_worker_to_judge_a_prediction_wins(tmp_path: Path):
    """Two workers' views of one file: an id is new once, whichever worker asks."""
    first, second = JudgedPredictions(tmp_path), JudgedPredictions(tmp_path)
    assert await first.first_time("p1") is True
    assert await second.first_time("p1") is False
    assert await first.first_time("p1") is False
    assert await second.first_time("p2") is True


async def test_concurrent_marks_of_one_id_let_exactly_one_through(tmp_path: Path):
    """Twenty marks of the same id at once, from two workers' views: one is the first."""
    views = [JudgedPredictions(tmp_path), JudgedPredictions(tmp_path)]
    answers = await asyncio.gather(*(views[i % 2].first_time("same") for i in range(20)))
    assert sorted(answers, key=str) == [False] * 19 + [True]


async def test_only_the_latest_ids_are_kept(tmp_path: Path):
    """With keep=3, trimmed every 2 inserts: old ids are forgotten, the table stays small."""
    judged = JudgedPredictions(tmp_path, keep=3, trim_every=2)
    for n in range(10):
        assert await judged.first_time(f"p{n}") is True
    with sqlite3.connect(judged.path) as connection:
        kept = [row[0] for row in connection.execute("SELECT id FROM judged ORDER BY rowid")]
    assert kept == ["p7", "p8", "p9"]
    assert await judged.first_time("p9") is False
    assert await judged.first_time("p0") is True  # forgotten: judged anew


async def test_an_unusable_file_leaves_the_decision_to_the_worker(tmp_path: Path):
    """A file that is not a database: None (the worker's own memory decides), counted."""
    judged = JudgedPredictions(tmp_path)
    judged.path.write_bytes(b"this is not a database, only bytes " * 100)
    assert await judged.first_time("p1") is None
    assert judged.errors == 1


async def test_a_released_mark_lets_the_outcome_be_taken_again(tmp_path: Path):
    """An outcome that could not be audited is released, so its retry is the first, once."""
    first, second = JudgedPredictions(tmp_path), JudgedPredictions(tmp_path)
    assert await first.first_time("p1") is True
    await first.release("p1")
    assert await second.first_time("p1") is True
    assert await first.first_time("p1") is False
