"""mypy --strict over the package as it installs (pyisolate.broker, pyisolate.workers inside)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyisolate._envs.runtime import runtime_dir

ROOT = Path(__file__).resolve().parents[2]


def test_package_passes_mypy_strict(tmp_path):
    pytest.importorskip("mypy")
    runtime = runtime_dir(tmp_path / "venvs")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "pyisolate").symlink_to(runtime / "pyisolate")  # only our code, not zmq or msgpack
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "pyisolate"],
        cwd=tree, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
