"""Start ``aigw serve`` with benchmark-only hooks, without changing the gateway's code.

``python bench/launch_gateway.py [--heap-census FILE] serve --port P``

- ``--heap-census FILE``: on SIGUSR1 the process writes to FILE how many memory blocks the
  interpreter has allocated and how many objects of each type the garbage collector tracks,
  so a soak can tell a Python-level leak (some type keeps growing) from allocator behaviour
  (RSS moves, object counts do not). Costs nothing until the signal arrives.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import time


def _census_handler(path: str):  # type: ignore[no-untyped-def]
    def dump(_signum: int, _frame: object) -> None:
        started = time.perf_counter()
        counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
        out = {
            "allocated_blocks": sys.getallocatedblocks(),
            "gc_objects": sum(counts.values()),
            "by_type": dict(counts.most_common(60)),
            "pause_ms": 0.0,
        }
        out["pause_ms"] = round((time.perf_counter() - started) * 1000, 1)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(out, fh)
        os.replace(tmp, path)

    return dump


def main(argv: list[str]) -> int:
    # Run as a script, this file's folder is sys.path[0]: keep bench/ modules out of the way.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if "--heap-census" in argv:
        i = argv.index("--heap-census")
        path = argv[i + 1]
        del argv[i : i + 2]
        signal.signal(signal.SIGUSR1, _census_handler(path))
    from gateway.cli import main as aigw

    return aigw(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
