"""Counters of the calls one actor makes to another: cheap enough to stay on for every call.

The host keeps one ``CallStats`` per extension; ``calls.Calls`` updates it around each call it
makes to that extension (a few integer additions and one histogram bucket per call, no list
that grows with the number of calls). Latency percentiles come from ``Histogram``, a fixed
array of log-spaced buckets (four per doubling, 1 us to about 18 minutes), so a percentile is
exact to within one bucket: it is reported as the bucket's upper edge, at most 19% above the
true value. Methods are counted apart up to ``MAX_METHODS`` names per extension; calls to
further names are counted under ``OTHER_METHODS``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["BUCKETS", "CallStats", "Histogram", "MAX_METHODS", "OTHER_METHODS"]

#: Buckets per doubling of latency: each bucket spans a factor of 2 ** (1/4) (about 1.19).
PER_OCTAVE = 4
#: Bucket 0 holds latencies up to 1 us; bucket i (1 <= i < BUCKETS - 1) those up to 2 ** (i/4) us;
#: the last one all longer ones (2 ** 30 us: about 18 minutes).
BUCKETS = 30 * PER_OCTAVE + 2
#: Distinct method names counted apart per extension (the host's code picks them: this bounds a
#: host that calls generated names); the rest are counted under ``OTHER_METHODS``.
MAX_METHODS = 256
OTHER_METHODS = "<other>"


class Histogram:
    """Latencies in fixed log-spaced buckets: constant memory, one increment per sample."""

    __slots__ = ("counts", "count")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0

    def add(self, seconds: float) -> None:
        """Count one latency of ``seconds``."""
        micros = seconds * 1e6
        if micros <= 1.0:
            index = 0
        else:
            index = min(int(math.log2(micros) * PER_OCTAVE) + 1, BUCKETS - 1)
        self.counts[index] += 1
        self.count += 1

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to these."""
        counts = list(other.counts)
        for i in range(BUCKETS):
            self.counts[i] += counts[i]
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The latency (seconds) below which a fraction ``q`` of samples lie, rounded up to the
        upper edge of its bucket; None without samples."""
        counts = list(self.counts)  # a copy: another thread may read while the loop counts
        total = sum(counts)
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index, n in enumerate(counts):
            seen += n
            if seen >= rank:
                return upper_edge(index)
        return upper_edge(BUCKETS - 1)


def upper_edge(index: int) -> float:
    """The longest latency (seconds) bucket ``index`` holds (the last: its lower edge)."""
    if index == 0:
        return 1e-6
    return float(2 ** (min(index, BUCKETS - 2) / PER_OCTAVE) * 1e-6)


class MethodStats:
    """Calls of one method: how many, how many failed, how long they took."""

    __slots__ = ("calls", "errors", "latency")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.latency = Histogram()

    def snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": self.errors,
                "p50": self.latency.quantile(0.5), "p99": self.latency.quantile(0.99)}


class CallStats:
    """What the host's calls to one extension did, since it was loaded (restarts included).

    ``calls`` counts calls that ended (answered, failed, timed out or cancelled); ``errors``
    counts those that did not return a value, by exception type name (``CancelledError`` for a
    caller that gave up). Bytes are message sizes as sent and received (header excluded);
    shared-memory bytes are counted by the shared-memory layer itself (see ``pyisolate._wire.shm``).
    ``reloads`` is counted by whatever replaces the extension's worker on purpose: call
    ``count_reload()`` once per completed reload.
    """

    __slots__ = ("calls", "errors", "bytes_out", "bytes_in", "methods", "reloads", "restarts_before")

    def __init__(self) -> None:
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.bytes_out = 0
        self.bytes_in = 0
        self.methods: dict[str, MethodStats] = {}
        self.reloads = 0
        self.restarts_before = 0  # restarts of the workers reloads replaced

    def method(self, name: str) -> MethodStats:
        """The counters of method ``name`` (of ``OTHER_METHODS`` past ``MAX_METHODS`` names)."""
        stats = self.methods.get(name)
        if stats is None:
            if len(self.methods) >= MAX_METHODS:
                name = OTHER_METHODS
                stats = self.methods.get(name)
            if stats is None:
                stats = self.methods[name] = MethodStats()
        return stats

    def ended(self, method: str, seconds: float, error: BaseException | None) -> None:
        """One call of ``method`` ended after ``seconds``: with a value, or raising ``error``."""
        stats = self.method(method)
        stats.calls += 1
        stats.latency.add(seconds)
        self.calls += 1
        if error is not None:
            stats.errors += 1
            kind = type(error).__name__
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_reload(self, restarts: int = 0) -> None:
        """Count one completed reload of the extension (for the code that reloads it), and the
        ``restarts`` of the worker it replaced, so the extension's count goes on."""
        self.reloads += 1
        self.restarts_before += restarts

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain values (safe to read from another thread than the one counting)."""
        methods = dict(self.methods)
        overall = Histogram()
        for stats in methods.values():
            overall.merge(stats.latency)
        return {
            "calls": self.calls,
            "errors": dict(self.errors),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "reloads": self.reloads,
            "p50": overall.quantile(0.5),
            "p99": overall.quantile(0.99),
            "methods": {name: stats.snapshot() for name, stats in sorted(methods.items())},
        }
