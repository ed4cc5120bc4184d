"""The cyclic garbage collector, set up for a server that runs for weeks.

CPython's cyclic collector pauses the whole process while it walks every tracked container
of the generation it collects. A full (oldest-generation) collection walks them all, and the
gateway has a lot of them that never die: its modules, the contracts and policies compiled at
start-up (about 120,000 objects), and, under load, its bounded caches. Measured in the
benchmark, full collections came every 1-2 s under cache-miss load and each paused the loop
for 60-140 ms: that was most of the p99.

Three things make them cheap and rare, and none changes what gets collected:
- what start-up built is moved out of the collector's sight once it is ready
  (`settle_startup_heap`, `gc.freeze()`): those objects live as long as the process, and
  freezing only stops the collector from walking them; reference counting still frees them
  (a cycle among them that a policy reload drops stays: one start-up snapshot at most);
- long-lived records (cache entries, the decision ledger) are tuples of plain values, which
  the collector stops tracking (cache.py, experiments.py);
- the youngest generation is collected every `YOUNG_THRESHOLD` allocations instead of 700.
  Each young collection promotes whatever the requests in flight hold at that moment, and
  promoted objects are what brings on full collections; at 700 a request's objects were
  promoted several times over. Measured at 64 clients, cache miss: about 10% less gateway
  CPU per answer (bench/README.md, Round 5). The garbage a young collection finds (cycles
  only: everything else is freed by reference counting) waits a little longer.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("gateway.garbage")

YOUNG_THRESHOLD = 20_000
OLDER_THRESHOLDS = (20, 20)  # young collections per middle one, middle ones per full one


def settle_startup_heap() -> int:
    """Collect once, freeze what remains, and space out the collections from here on;
    returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    frozen = gc.get_freeze_count()
    log.debug("start-up heap frozen", extra={"objects": frozen})
    return frozen
