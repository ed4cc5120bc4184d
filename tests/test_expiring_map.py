"""The map that forgets: bounded in number and in age, whatever is put in it."""

from __future__ import annotations

from gateway.expiring_map import ExpiringMap


def test_entries_expire_keep_s_after_they_were_put():
    kept: ExpiringMap[str, int] = ExpiringMap(limit=10, keep_s=5)
    kept.put("a", 1, now=0.0)
    kept.put("b", 2, now=3.0)
    assert (kept.get("a", now=4.9), kept.get("b", now=4.9)) == (1, 2)
    assert (kept.get("a", now=5.0), kept.get("b", now=5.0)) == (None, 2)
    kept.put("b", 3, now=6.0)  # put again: kept from now
    assert kept.get("b", now=10.9) == 3
    assert len(kept) == 1


def test_the_oldest_go_beyond_the_limit_and_pop_takes_one_out():
    kept: ExpiringMap[str, int] = ExpiringMap(limit=2, keep_s=60)
    for n, key in enumerate("abc"):
        kept.put(key, n, now=float(n))
    assert [kept.get(key, now=3.0) for key in "abc"] == [None, 1, 2]
    assert kept.pop("b") == 1 and kept.pop("b") is None
    assert len(kept) == 1
