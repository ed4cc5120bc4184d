"""The cyclic garbage collector, set up for a server that runs for weeks.

CPython's cyclic collector pauses the whole process while it walks every tracked container
of the generation it collects. A full (oldest-generation) collection walks them all, and the
gateway has a lot of them that never die: its modules, the contracts and policies compiled at
start-up (about 120,000 objects), and, under load, its bounded caches. Measured in the
benchmark, full collections came every 1-2 s under cache-miss load and each paused the loop
for 60-140 ms: that was most of the p99.

Two things make them cheap, and neither changes what gets collected:
- what start-up built is moved out of the collector's sight once it is ready
  (`settle_startup_heap`, `gc.freeze()`): those objects live as long as the process, and
  freezing only stops the collector from walking them; reference counting still frees them
  (a cycle among them that a policy reload drops stays: one start-up snapshot at most);
- long-lived records (cache entries, the decision ledger) are plain tuples of plain values,
  which the collector stops tracking at the first young collection they survive
  (cache.py, experiments.py).

The thresholds stay CPython's (700, 10, 10). Raising the young one to 20,000 saved about
10% of CPU per cache miss in 5-second rows, but the young generation then held 10,000-20,000
not-yet-untracked records at any time, and 186,000 at the end of a 5-minute soak: a
collection that walks them all is the pause this module exists to avoid.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("gateway.garbage")


def settle_startup_heap() -> int:
    """Collect once, then freeze what remains; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("start-up heap frozen", extra={"objects": frozen})
    return frozen
