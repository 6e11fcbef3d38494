"""The chaos soak, short: steady load and fan-in overload while workers are SIGKILLed.

Every call must end with its own value or the typed error of a fault that hit it; a timeout
on a healthy worker, any other error, a wrong value or a raw zmq error counts as lost.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("PYISOLATE_SOAK_SECONDS", "120"))

pytestmark = pytest.mark.venv


def load_soak():
    spec = importlib.util.spec_from_file_location("chaos_soak", ROOT / "benchmarks" / "chaos_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.soak


async def test_chaos_soak_loses_no_call_and_leaks_nothing(venv_root):
    counts = await load_soak()(venv_root, SECONDS, extensions=4, clients=16, kill_every=1.0)
    print(counts)
    assert counts["lost"] == 0 and counts["raw_zmq"] == 0, counts
    assert counts["leaked_processes"] == counts["leaked_fds"] == counts["leaked_segments"] == 0, counts
    assert counts["kills"] > 10 and counts["restarts"] > 10 and counts["ok"] > counts["caused"], counts
