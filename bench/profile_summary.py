"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as text.

``python bench/profile_summary.py bench/results/profile-c-64-<ts>.txt`` prints where the
samples' leaf frames sit (by package), then the top functions by self and by inclusive time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")

# Leaf frames are grouped by where their file lives (first match wins).
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("gateway/audit", "gateway: audit log"),
    ("gateway/backends", "gateway: Triton client code"),
    ("gateway/", "gateway: other modules"),
    ("tritonclient/", "tritonclient"),
    ("aiohttp/", "aiohttp (tritonclient's HTTP)"),
    ("geventhttpclient/", "geventhttpclient"),
    ("starlette/", "starlette"),
    ("fastapi/", "fastapi"),
    ("uvicorn/", "uvicorn"),
    ("prometheus_client/", "prometheus_client"),
    ("pydantic", "pydantic"),
    ("numpy/", "numpy"),
    ("json", "json (stdlib)"),
    ("asyncio/", "asyncio (stdlib)"),
    ("logging/", "logging (stdlib)"),
    ("uuid.py", "uuid (stdlib)"),
    ("datetime", "datetime (stdlib)"),
    ("dataclasses.py", "dataclasses (stdlib)"),
    ("hashlib", "hashlib (stdlib)"),
    ("hmac.py", "hmac (stdlib)"),
)


# Each sample is charged to the stage of its leaf-most frame that belongs to one (helpers such
# as contextlib or dataclasses belong to whoever called them).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("OpenTelemetry spans", ("opentelemetry/", "gateway/tracing.py")),
    ("audit log (records, hash chain, writer threads)", ("gateway/audit.py",)),
    (
        "Triton call (gateway client, tritonclient, aiohttp)",
        (
            "gateway/backends/",
            "gateway/batching.py",
            "tritonclient/",
            "aiohttp/",
            "yarl/",
            "multidict/",
        ),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/", "gateway/telemetry.py")),
    ("request id (uuid4)", ("uuid.py",)),
    (
        "gateway: pipeline, validation, routing, cache, chain, rules",
        (
            "gateway/pipeline.py",
            "gateway/routing.py",
            "gateway/cache.py",
            "gateway/fallback.py",
            "gateway/resilience.py",
            "gateway/rules.py",
            "gateway/expressions.py",
            "gateway/contracts.py",
            "gateway/body.py",
            "gateway/experiments.py",
            "gateway/shadow.py",
            "gateway/runtime.py",
            "gateway/policy",
        ),
    ),
    ("gateway: HTTP handlers and middleware", ("gateway/api/", "gateway/app.py", "gateway/")),
    (
        "ASGI stack (uvicorn, Starlette, FastAPI)",
        ("uvicorn/", "starlette/", "fastapi/", "httptools/", "anyio/"),
    ),
    ("event loop (asyncio)", ("asyncio/", "selectors.py", "uvloop/")),
    ("threads (queue/wait)", ("threading.py", "queue.py")),
)


@dataclass(frozen=True)
class Frame:
    func: str
    path: str

    @property
    def short_path(self) -> str:
        for marker in ("site-packages/", "/lib/python3"):
            if marker in self.path:
                tail = self.path.split(marker, 1)[1]
                return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
        for marker in ("/gateway/",):
            if marker in self.path:
                return "gateway/" + self.path.split(marker, 1)[1]
        return self.path

    def label(self) -> str:
        return f"{self.func} ({self.short_path})"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text.strip())
    if m is None:
        return Frame(text.strip(), "")
    return Frame(m.group("func"), m.group("path"))


def read_stacks(path: Path) -> list[tuple[str, list[Frame], int]]:
    """``(thread, frames root first, samples)``; thread is "" unless recorded with --threads."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = [f for f in stack.split(";") if f]
        thread = ""
        if parts and parts[0].startswith("thread ("):
            thread = parts.pop(0).split(": ", 1)[-1]
        stacks.append((thread, [parse_frame(f) for f in parts], int(count)))
    return stacks


def component(frame: Frame) -> str:
    p = frame.short_path
    for marker, name in COMPONENTS:
        if marker in p or marker in frame.path:
            return name
    return p.split("/", 1)[0] if "/" in p else (p or "?")


def stage(frames: list[Frame]) -> str:
    for frame in reversed(frames):
        where = frame.short_path if "site-packages" in frame.path else frame.path
        for name, markers in STAGES:
            if any(m in where or m in frame.short_path for m in markers):
                return name
    return "other" if frames else "(no Python frame: in C, e.g. the event loop's poll)"


def summarise(path: Path, top: int = 15) -> dict[str, object]:
    """Shares of samples: by component of the leaf frame, by function self and inclusive."""
    stacks = read_stacks(path)
    total = sum(count for _, _, count in stacks) or 1
    by_thread: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for thread, frames, count in stacks:
        by_thread[thread or "all threads"] += count
        by_stage[stage(frames)] += count
        if not frames:
            by_component["(no Python frame: in C, e.g. the event loop's poll)"] += count
            continue
        leaf = frames[-1]
        by_component[component(leaf)] += count
        self_time[leaf.label()] += count
        for label in {f.label() for f in frames}:
            inclusive[label] += count

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "by_thread_pct": pct(by_thread, 10),
        "by_stage_pct": pct(by_stage, 20),
        "leaf_by_component_pct": pct(by_component, 25),
        "self_pct": pct(self_time, top),
        "inclusive_pct": pct(inclusive, top + 15),
    }


def to_text(summary: dict[str, object]) -> str:
    lines = [f"samples: {summary['samples']} (all threads)", "", "by thread (% of samples):"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["by_thread_pct"]]  # type: ignore[union-attr]
    lines += ["", "by stage, leaf-most frame that belongs to one (% of samples):"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["by_stage_pct"]]  # type: ignore[union-attr]
    lines += ["", "leaf frame by component (% of samples):"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["leaf_by_component_pct"]]  # type: ignore[union-attr]
    lines += ["", "top functions by self time:"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["self_pct"]]  # type: ignore[union-attr]
    lines += ["", "top functions by inclusive time:"]
    lines += [f"  {v:5.1f}%  {k}" for k, v in summary["inclusive_pct"]]  # type: ignore[union-attr]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(to_text(summarise(args.profile, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
