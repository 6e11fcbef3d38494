"""Shared pieces of the benchmark suite: the result record, statistics, timing helpers.

Every measure is a :class:`Result`. A result that has a ``baseline`` (the name of another
result measured in the same run, usually a floor) gets ``ratio`` = value / baseline value,
oriented so that lower is better for every unit (throughput ratios are baseline / value).
A ``target`` is the largest acceptable ratio (or, with no baseline, the largest acceptable
value); quick mode fails a run whose ratio is more than twice its target.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_EXT = ROOT / "benchmarks" / "bench_ext"

#: Units in which a larger value is better.
HIGHER_IS_BETTER = frozenset({"calls/s", "MB/s"})


@dataclasses.dataclass
class Result:
    """One measured figure."""

    name: str  # unique key, e.g. "call.host_ext.async"
    group: str  # table section, e.g. "small call"
    label: str  # what a reader sees
    value: float  # median (or the single figure)
    unit: str  # "us", "ms", "s", "calls/s", "MB", "fds"
    p99: float | None = None
    baseline: str | None = None  # name of the result this one is a ratio to
    target: float | None = None  # max ratio (with a baseline) or max value (without)
    target_note: str = ""  # what the target says, in words
    size: int | None = None  # payload bytes, for the size chart
    series: str | None = None  # chart series this point belongs to
    ratio: float | None = None  # filled in by resolve()
    classic: float | None = None  # the same measure through pyisolate 0.10.2 (--compare)
    classic_ratio: float | None = None  # how many times better than classic (higher is better)
    classic_target: float | None = None  # min classic_ratio asked for
    samples: int = 0
    ci_check: bool = True  # False: reported, but --check does not fail on it (target_note says why)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def verdict(self, slack: float = 1.0) -> bool | None:
        """Whether the target holds (with ``slack`` times the target allowed); None: no target."""
        ok: bool | None = None
        if self.target is not None:
            figure = self.ratio if self.baseline is not None else self.value
            if figure is not None:
                ok = figure <= self.target * slack
        if self.classic_target is not None and self.classic_ratio is not None:
            ok = (ok is not False) and self.classic_ratio * slack >= self.classic_target
        return ok


def resolve(results: list[Result]) -> None:
    """Fill in each result's ratio to its baseline (lower is better)."""
    by_name = {r.name: r for r in results}
    for r in results:
        base = by_name.get(r.baseline) if r.baseline else None
        if base is None or not base.value or not r.value:
            continue
        r.ratio = base.value / r.value if r.unit in HIGHER_IS_BETTER else r.value / base.value


def median_p99(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[max(0, int(len(ordered) * 0.99) - 1)]


async def time_calls(call: Callable[[], Awaitable[Any]], count: int, warmup: int = 100) -> list[float]:
    """Per-call latency samples, in microseconds, of ``count`` sequential awaits of ``call()``."""
    for _ in range(warmup):
        await call()
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        await call()
        samples.append((clock() - start) * 1e6)
    return samples


def memory_of(pid: int) -> dict[str, float]:
    """PSS, USS and RSS of a process in MB (from /proc/PID/smaps_rollup).

    Not for workers: they are non-dumpable, so only root may read their /proc files; a worker
    reports its own (``memory_from(await ext.smaps_rollup())``).
    """
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return memory_from(f.read())


def memory_from(smaps_rollup: str) -> dict[str, float]:
    """PSS, USS and RSS in MB, from the text of a smaps_rollup file."""
    fields: dict[str, int] = {}
    for line in smaps_rollup.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"pss": fields.get("Pss", 0) / 1024, "uss": uss / 1024, "rss": fields.get("Rss", 0) / 1024}


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def size_label(size: int) -> str:
    """1 KiB, 4 MiB, 1 GiB."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def section_main(measure: Callable[[Path, bool], Awaitable[list[Result]]], doc: str | None, prefix: str) -> None:
    """Run one section of the suite alone (``python benchmarks/<section>.py [--quick]``) and print it."""
    import argparse
    import asyncio
    import tempfile

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        results = asyncio.run(measure(Path(work), args.quick))
    resolve(results)
    for r in results:
        ratio = f"  {r.ratio:.2f}x {r.baseline}" if r.ratio is not None else ""
        print(f"{r.label:<70} {r.value:>10.1f} {r.unit}{ratio}")
