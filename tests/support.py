"""Helpers for tests: fixture extension paths, child processes, broker ipc directories."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

EXTENSIONS = Path(__file__).parent / "extensions"


def ext(name: str) -> str:
    """Path of a fixture extension under tests/extensions."""
    return str(EXTENSIONS / name)


def child_pids() -> set[int]:
    """Live (or unreaped) child processes of this process."""
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def ipc_dirs() -> set[str]:
    """Broker ipc directories of this process (tests of other runs may share /tmp)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"pyisolate-{os.getpid()}-*")))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each refers to."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return fds


def block_until_readable(fd: int, seconds: float) -> None:
    """Block this thread (and so its event loop) until ``fd`` is readable, at most ``seconds``.

    For tests that need the host's loop blocked while a worker does something: they block on
    the worker's own signal (a FIFO it writes, its pidfd), not for a guessed time.
    """
    import select

    readable, _, _ = select.select([fd], [], [], seconds)
    assert readable, f"nothing to read within {seconds} s"


def fifo(path: Path) -> int:
    """Make a FIFO at ``path`` and open its reading end without blocking; the caller closes it."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)
