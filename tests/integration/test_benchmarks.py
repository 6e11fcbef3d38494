"""The benchmark suite's quick mode, as CI runs it: every measure is taken, results.json and
chart.png are written, and the run fails when a figure is more than 2x past its target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What the quick mode must measure, at least: the issue's measures and their floors.
EXPECTED = {
    "floor.direct", "floor.bare", "floor.relay", "floor.relay.bare", "floor.pipe",
    "call.host_ext.async", "call.host_ext.plain", "call.sync_thread", "call.ext_singleton", "call.ext_ext",
    "call.host_ext.stats_off", "stats.small_call",
    "throughput.floor.direct", "throughput.floor.relay", "throughput.host_ext", "throughput.ext_singleton",
    "throughput.ext_ext",
    "bytes.raw.1048576", "bytes.1048576",
    "tensor.small_call", "tensor.shared.1024", "tensor.shared.67108864", "tensor.fresh.67108864",
    "tensor.returned.1024", "tensor.roundtrip.1024",
    "tensor.fresh_copy.4194304", "tensor.fresh_sent.4194304", "tensor.fresh_returned.4194304",
    "tensor.fresh_copy.67108864", "tensor.fresh_sent.67108864", "tensor.fresh_returned.67108864",
    "start.cold", "start.warm", "start.warm.over_floor", "memory.idle.pss", "memory.idle.uss", "memory.torch.extra",
    "scale.load.1", "scale.load.10", "scale.load.10.over_floor",
    "packs.load.spawn", "packs.load.fork", "packs.load.prestarted", "packs.uss.spawn", "packs.uss.fork",
    "sandbox.start.unconfined", "sandbox.start.landlock", "sandbox.call.unconfined", "sandbox.call.landlock",
    "types.value.dict", "types.value.dataclass", "types.call.singleton", "types.call.handle",
    "workflow.in_process", "workflow.process_floor", "workflow.isolated", "workflow.isolated.over_floor",
    "workflow.uss.host", "workflow.uss.workers",
    "trace.call.off", "trace.call.on",
    "remote.floor.direct", "remote.floor.bare", "remote.call.small", "remote.floor.tensor.67108864",
    "remote.tensor.67108864",
}  # fmt: skip

pytestmark = pytest.mark.venv


def test_quick_benchmarks_meet_their_targets_within_2x(tmp_path: Path, venv_root: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--check", "--out", str(out),
         "--work", str(venv_root / "bench")],
        capture_output=True, text=True, timeout=600,
    )
    report = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert report is not None and report["quick"] is True
    results = {r["name"]: r for r in report["results"]}
    assert EXPECTED <= results.keys(), f"missing: {sorted(EXPECTED - results.keys())}"
    for name, r in results.items():
        assert r["value"] > 0, f"{name} measured nothing"
        if r["baseline"] is not None:
            assert r["ratio"] is not None, f"{name} has no ratio to {r['baseline']}"
    assert report["failed_checks"] == []
    assert "targets met" in proc.stdout and "call.host_ext.async" not in report["failed_checks"]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_fails_a_figure_more_than_2x_past_its_target() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import Result, resolve
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    floor = Result("floor", "g", "floor", 100.0, "us")
    slow = Result("slow", "g", "slow", 260.0, "us", baseline="floor", target=1.25)
    near = Result("near", "g", "near", 200.0, "us", baseline="floor", target=1.25)
    fast_rate = Result("rate", "g", "rate", 900.0, "calls/s", baseline="floor_rate", target=1 / 0.8)
    floor_rate = Result("floor_rate", "g", "floor rate", 1000.0, "calls/s")
    resolve([floor, slow, near, fast_rate, floor_rate])
    assert slow.ratio == pytest.approx(2.6) and slow.verdict(2.0) is False
    assert near.verdict() is False and near.verdict(2.0) is True  # missed, but within the CI slack
    assert fast_rate.ratio == pytest.approx(1000 / 900) and fast_rate.verdict() is True
