"""Shared fixtures: a venv root reused across the session, managers that always stop, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import child_pids, ipc_dirs


@pytest.fixture(scope="session")
def venv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv root for the whole run, so each extension's venv is built once.

    Set PYISOLATE_TEST_VENVS to keep the venvs between runs.
    """
    keep = os.environ.get("PYISOLATE_TEST_VENVS")
    return Path(keep) if keep else tmp_path_factory.mktemp("venvs")


@pytest.fixture
async def manager(venv_root: Path):
    """A manager on the test's loop, stopped (every worker with it) when the test ends."""
    from pyisolate import ExtensionBase, ExtensionManager, ExtensionManagerConfig

    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as m:
        yield m


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no child process and no broker ipc directory behind."""
    before_ipc = ipc_dirs()
    yield
    assert child_pids() == set(), "a test left child processes running"
    assert ipc_dirs() - before_ipc == set(), "a test left a broker ipc directory behind"
