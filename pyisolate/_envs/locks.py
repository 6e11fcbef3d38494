"""The flock that serialises building, checking and removing one venv, across processes.

Opening the lock file and waiting for a contended lock happen off the event loop: the open is
file work (the issue of twenty extensions loading at once), the wait may last a whole build.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

__all__ = ["exclusive_lock", "lock_path"]

_log = logging.getLogger("pyisolate.venv")


def lock_path(venv_root: Path, name: str) -> Path:
    """The file whose flock serialises building, checking and removing venv ``name`` (its
    directory is created)."""
    locks = venv_root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{name}.lock"


def _try_lock(root: Path, name: str) -> tuple[int, bool]:
    """Open venv ``name``'s lock file and try to lock it without waiting: (its fd, whether locked)."""
    fd = os.open(lock_path(root, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, False
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def _wait_lock(fd: int) -> asyncio.Future[None]:
    """Wait for the flock on ``fd`` in a thread of its own, not one of the loop's default executor:
    a wait may last a whole build, and a builder in this process needs those threads to finish."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            error = None
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=wait, name="pyisolate-venv-lock", daemon=True).start()
    return done


@contextlib.asynccontextmanager
async def exclusive_lock(root: Path, name: str, on_wait: Callable[[], None]) -> AsyncIterator[None]:
    """Hold the exclusive flock of venv ``name``; opening it and any contended wait (``on_wait``
    first) run off the loop."""
    opening = asyncio.ensure_future(asyncio.to_thread(_try_lock, root, name))
    try:
        fd, locked = await asyncio.shield(opening)
    except BaseException:
        def close(f: asyncio.Future[tuple[int, bool]]) -> None:  # the thread may open it still
            if not f.cancelled() and f.exception() is None:
                os.close(f.result()[0])

        opening.add_done_callback(close)
        raise
    if not locked:
        _log.debug("waiting for the lock of venv %s", name)
        waiter = _wait_lock(fd)
        try:
            on_wait()
            await asyncio.shield(waiter)
        except BaseException:
            if waiter.done():
                os.close(fd)
            else:  # the thread may still be blocked in flock(): close the fd once it returns
                waiter.add_done_callback(lambda _: os.close(fd))
            raise
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
