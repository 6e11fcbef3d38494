"""The call counters' arithmetic: log-bucket percentiles, bounded memory, method names capped."""

from __future__ import annotations

import math
import random

import pytest

from pyisolate._rpc.stats import BUCKETS, MAX_METHODS, OTHER_METHODS, CallStats, Histogram


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_are_within_one_bucket_above_the_exact_ones(seed):
    rng = random.Random(seed)
    samples = [rng.lognormvariate(math.log(500e-6), 1.5) for _ in range(5000)]
    histogram = Histogram()
    for sample in samples:
        histogram.add(sample)
    ordered = sorted(samples)
    for q in (0.5, 0.9, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        assert exact <= histogram.quantile(q) <= exact * 2 ** 0.25 * (1 + 1e-9), q


def test_memory_does_not_grow_with_the_number_of_samples():
    histogram = Histogram()
    for i in range(200_000):
        histogram.add((i % 1000) * 1e-5)
    assert len(histogram.counts) == BUCKETS and histogram.count == 200_000


def test_extremes_land_in_the_first_and_last_buckets():
    histogram = Histogram()
    assert histogram.quantile(0.5) is None
    histogram.add(0.0)
    histogram.add(1e9)  # a call that took 30 years: the overflow bucket
    assert histogram.counts[0] == 1 and histogram.counts[-1] == 1
    assert histogram.quantile(0.5) == 1e-6


def test_errors_by_type_and_calls_per_method():
    stats = CallStats()
    stats.ended("a", 0.001, None)
    stats.ended("a", 0.002, ValueError("x"))
    stats.ended("b", 0.003, KeyError("y"))
    stats.ended("b", 0.003, ValueError("z"))
    snapshot = stats.snapshot()
    assert snapshot["calls"] == 4
    assert snapshot["errors"] == {"ValueError": 2, "KeyError": 1}
    assert snapshot["methods"]["a"]["calls"] == 2 and snapshot["methods"]["a"]["errors"] == 1
    assert snapshot["methods"]["b"]["calls"] == 2 and snapshot["methods"]["b"]["errors"] == 2


def test_method_names_past_the_cap_are_counted_together():
    stats = CallStats()
    for i in range(MAX_METHODS + 50):
        stats.ended(f"m{i}", 0.001, None)
    assert len(stats.methods) == MAX_METHODS + 1
    assert stats.methods[OTHER_METHODS].calls == 50 and stats.calls == MAX_METHODS + 50


def test_reloads_are_counted_by_whoever_reloads():
    stats = CallStats()
    stats.count_reload()
    stats.count_reload()
    assert stats.snapshot()["reloads"] == 2


def test_top_rates_come_from_two_snapshots():
    from pyisolate._cli.inspect import render, rows

    def snapshot(at: float, calls: int, cpu: float) -> dict:
        return {"pid": 1, "time": at, "extensions": {"a": {
            "state": "ready", "pid": 7, "calls": calls, "errors": {"ValueError": 2, "KeyError": 1}, "p99": 0.0015,
            "in_flight": 3, "queued": 4, "rss": 3 << 20, "pss": None, "cpu_seconds": cpu, "restarts": 1}}}

    assert rows(snapshot(12.0, 30, 2.0), snapshot(10.0, 10, 1.0)) == [
        ["a", "ready", "7", "10.0", "30", "3", "1.5ms", "3", "4", "3.0M", "-", "50", "1"]]
    assert rows(snapshot(12.0, 30, 2.0), None)[0][3] == "-"  # no rate from one snapshot
    assert render(snapshot(12.0, 30, 2.0), None).splitlines()[0] == "pyisolate host 1: 1 extension(s)"
