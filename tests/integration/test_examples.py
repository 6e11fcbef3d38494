"""Every example under examples/ runs to completion: exit code 0, some output, and no warning.

Each example builds its extensions' venvs under its own ``examples/<name>/venvs`` folder
(git-ignored) and reuses them on later runs. ``examples/demo`` and ``examples/host_app`` install numpy
(1.x and 2.x, the same versions); the others have no dependencies and run in a couple of seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.venv

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/*/main.py"))
TIMEOUT = 600


def test_examples_are_found():
    names = {path.parent.name for path in EXAMPLES}
    assert {"demo", "singletons", "actors", "callbacks", "context", "streams", "events", "sync", "host_app"} <= names


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("main", EXAMPLES, ids=[path.parent.name for path in EXAMPLES])
def test_example_runs(main: Path):
    result = subprocess.run(
        [sys.executable, str(main)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, (
        f"{main.relative_to(ROOT)} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    assert result.stdout.strip(), f"{main.relative_to(ROOT)} printed nothing; stderr:\n{result.stderr}"
    # A newcomer's first question would be about it (torch's "Failed to initialize NumPy", say).
    assert not re.search(r"\w+Warning: ", result.stderr), result.stderr
