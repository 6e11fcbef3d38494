"""Shared fixtures: a venv root reused across the session, managers that always stop, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import child_pids, ipc_dirs, open_fds


@pytest.fixture(scope="session")
def venv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv root for the whole run, so each extension's venv is built once.

    Set PYISOLATE_TEST_VENVS to keep the venvs between runs.
    """
    keep = os.environ.get("PYISOLATE_TEST_VENVS")
    return Path(keep) if keep else tmp_path_factory.mktemp("venvs")


@pytest.fixture
async def manager(venv_root: Path, tmp_path: Path):
    """A manager on the test's loop, stopped (every worker with it) when the test ends.

    Its workers are confined as by default, and may also write the test's ``tmp_path`` (the
    markers and FIFOs through which tests and extensions meet).
    """
    from pyisolate import ExtensionBase, ExtensionManager, ExtensionManagerConfig

    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox={"writable_paths": [tmp_path]})
    async with ExtensionManager(ExtensionBase, config) as m:
        yield m


#: The longest any remote call of a test may take, unless the test sets its own call_timeout.
CALL_BOUND = 60.0


@pytest.fixture(autouse=True)
def bounded_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every remote call a test makes has its own bound: managers made in tests default to
    ``call_timeout=CALL_BOUND``, so a call that never ends fails with CallTimeoutError within a
    minute instead of waiting for pytest's timeout. (Awaits on anything else carry an
    ``asyncio.timeout`` of their own in the tests.)"""
    from pyisolate._config import ExtensionManagerConfig

    defaults = ExtensionManagerConfig.__init__.__kwdefaults__
    assert defaults is not None and defaults["call_timeout"] is None
    monkeypatch.setitem(defaults, "call_timeout", CALL_BOUND)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no child process and no broker ipc directory behind."""
    before_ipc = ipc_dirs()
    yield
    assert child_pids() == set(), "a test left child processes running"
    assert ipc_dirs() - before_ipc == set(), "a test left a broker ipc directory behind"


@pytest.fixture(scope="session", autouse=True)
def process_singletons() -> None:
    """Start what lives as long as the process before no_fd_leaks counts: pyzmq's garbage
    collector of zero-copy frames (a thread, a context and sockets, made on the first large send)."""
    import zmq

    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    pair[0].bind("inproc://pyisolate-tests-warm-up")
    pair[1].connect("inproc://pyisolate-tests-warm-up")
    pair[0].send(bytes(1 << 17), copy=False)
    pair[1].recv()
    for sock in pair:
        sock.close(linger=0)
    ctx.term()


@pytest.fixture(autouse=True)
def no_fd_leaks():
    """Every test closes the file descriptors it opened: pipes, sockets, channels, segments."""
    before = open_fds()
    yield
    left = {fd: target for fd, target in open_fds().items() if before.get(fd) != target}
    assert not left, f"a test left file descriptors open: {left}"
