"""The cyclic collector's view of the gateway: long-lived records untracked, start-up frozen."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from gateway.cache import CachedPrediction, MemoryCache
from gateway.experiments import Decision, Experiments
from tests.conftest import REPO

ENTRIES = 5_000


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_cache_entries_are_invisible_to_the_cyclic_collector():
    """Thousands of kept answers add (almost) nothing for a full collection to walk."""
    cache = MemoryCache(max_entries=ENTRIES)
    before = tracked_objects()
    for i in range(ENTRIES):
        await cache.set(f"key-{i}", CachedPrediction("churn", 0.5 + i / 1e6, "1", "gbm"), 300)
    assert len(cache) == ENTRIES
    assert tracked_objects() - before < ENTRIES / 50


def test_the_decision_ledger_is_invisible_to_the_cyclic_collector():
    experiments = Experiments(ledger_size=ENTRIES)
    before = tracked_objects()
    for i in range(ENTRIES):
        decision = Decision("customer-churn", "control", "churn", "acme", "gbm:1", i / ENTRIES)
        experiments.record_answer(f"id-{i}", decision, 1.0, degraded=False, cached=False)
    assert experiments.decision("id-0") is not None
    assert tracked_objects() - before < ENTRIES / 50


def test_a_started_public_server_has_frozen_its_start_up_heap(tmp_path):
    """`aigw serve`'s listener freezes what start-up built; run in a child process, because
    freezing would keep this test process's objects forever."""
    script = textwrap.dedent(
        f"""
        import asyncio, gc
        from gateway.app import create_app
        from gateway.server import _PublicServer, server_config
        from gateway.settings import Settings

        settings = Settings(
            contracts_dir={str(REPO / "contracts")!r},
            policies_dir={str(REPO / "policies")!r},
            fallbacks_dir={str(REPO / "fallbacks")!r},
            audit_dir={str(tmp_path / "audit")!r},
            watch_policies=False,
        )

        async def main():
            server = _PublicServer(server_config(create_app(settings), "127.0.0.1", 0))
            assert gc.get_freeze_count() == 0
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            print(gc.get_freeze_count())
            server.should_exit = True
            await serving

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10_000  # modules, contracts, policies: the whole start-up heap
