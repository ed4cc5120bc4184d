"""What the benchmark reads about processes from /proc (Linux only): memory, CPU, descriptors."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def status_kb(pid: int, field: str) -> int:
    """One ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kb(pids: Iterable[int]) -> int:
    """Current resident set size of the processes, summed."""
    return sum(status_kb(pid, "VmRSS") for pid in pids)


def peak_rss_kb(pids: Iterable[int]) -> int:
    """High-water mark of the resident set (VmHWM) of the processes, summed.

    Summing per-process peaks over-counts pages shared between them (Triton's Python backend
    stubs share libraries) and peaks that did not happen at the same moment: an upper bound.
    """
    return sum(status_kb(pid, "VmHWM") for pid in pids)


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Set VmHWM back to the current RSS (``echo 5 > /proc/<pid>/clear_refs``, Linux ≥ 4.0).

    Lets one long-lived process report the peak of each measurement separately. Returns False
    if any process refused (then the peaks include everything since the process started).
    """
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_ticks(pids: Iterable[int]) -> int:
    """User + system CPU time the processes have used so far, in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total


def system_busy_ticks() -> int:
    """Non-idle CPU time of the whole machine so far (all cores), in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user.
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def fd_count(pid: int) -> int:
    """Number of open file descriptors of a process; -1 when it cannot be read."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def thread_count(pid: int) -> int:
    """Number of threads of a process; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_count() -> int:
    """Cores the kernel shows (the load generator and every server share them)."""
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()
