"""The chaos soak, short: steady load while workers are SIGKILLed; nothing lost or leaked."""

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
    assert counts["lost"] == 0, counts
    assert counts["leaked_processes"] == counts["leaked_fds"] == counts["leaked_segments"] == 0, counts
    assert counts["kills"] > 0 and counts["restarts"] > 0 and counts["ok"] > 0, counts
    print(counts)
