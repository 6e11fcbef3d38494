"""Watch an extension's source for changes (``ExtensionConfig.watch``), with watchfiles.

watchfiles (the ``watch`` extra) is a maintained, native watcher (inotify here, FSEvents and
ReadDirectoryChangesW elsewhere) that groups a burst of writes into one batch: an editor's
save, a ``git checkout`` of many files, is one reload, not one per file.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["require_watchfiles", "watch_source"]

logger = logging.getLogger("pyisolate")

#: Milliseconds without a further change before a batch of changes is taken (watchfiles' step).
QUIET_MS = 100
#: Milliseconds at most that one batch gathers changes over (watchfiles' debounce).
DEBOUNCE_MS = 1600
#: Seconds a stopped watch waits for its native thread to let go of its descriptors.
RELEASE_WAIT = 5.0


def require_watchfiles(name: str) -> Any:
    """Return the watchfiles module, or raise ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module("watchfiles")
    except ImportError:
        raise ConfigError(
            f"ExtensionConfig.watch=True (extension {name!r}) needs the watchfiles package: "
            "pip install 'pyisolate[watch]' (or set watch=False and call ext.reload() yourself)"
        ) from None


async def watch_source(name: str, module_path: Path, on_change: Callable[[], Awaitable[None]],
                       on_watching: Callable[[], None] = lambda: None) -> None:
    """Call ``on_change()`` after each batch of changes under ``module_path``, until cancelled.

    A package directory is watched whole (compiled files, ``__pycache__`` and editor swap
    files ignored); a single-file module through its folder, for that file only (an editor
    that saves by renaming replaces the file the watch would otherwise lose). Changes made
    while ``on_change`` runs make one more batch, taken when it returns. ``on_watching()``
    runs once the watch is in place: a change made after it is seen.
    """
    watchfiles = require_watchfiles(name)
    default = watchfiles.DefaultFilter()
    if module_path.is_dir():
        root, only = module_path, None
    else:
        root, only = module_path.parent, str(module_path.absolute())

    def wanted(change: Any, path: str) -> bool:
        return bool(default(change, path)) and (only is None or path == only)

    stop = asyncio.Event()
    others = _watch_threads()
    batches = watchfiles.awatch(root, watch_filter=wanted, debounce=DEBOUNCE_MS, step=QUIET_MS, stop_event=stop)
    batch: asyncio.Future[Any] = asyncio.ensure_future(anext(batches))
    ours: set[str] = set()
    try:
        # awatch sets up its watches (inotify) in its first step, before it first waits; that
        # step runs before this task resumes (the loop runs ready callbacks in order).
        await asyncio.sleep(0)
        ours = _watch_threads() - others
        on_watching()
        while True:
            changes = await batch
            logger.info("extension %r: %d source change(s) seen; reloading", name, len(changes))
            await on_change()
            batch = asyncio.ensure_future(anext(batches))
    finally:
        stop.set()  # the watching thread ends at its next step
        batch.cancel()
        await asyncio.gather(batch, return_exceptions=True)
        await batches.aclose()
        if ours:
            await asyncio.to_thread(_wait_gone, ours, RELEASE_WAIT)


def _watch_threads() -> set[str]:
    """Ids of this process's threads that the native watcher (notify, under watchfiles) runs."""
    found: set[str] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # no /proc: nothing to wait for
        return found
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("notify-rs"):
                    found.add(tid)
        except OSError:
            continue
    return found


def _wait_gone(threads: set[str], timeout: float) -> None:
    """Wait until ``threads`` have exited (or ``timeout``): closing a watch only tells notify's
    thread to stop, and that thread closes its epoll and eventfd descriptors as it exits; there
    is no handle to join, so its ``/proc`` entry is watched."""
    deadline = time.monotonic() + timeout
    while threads & _watch_threads() and time.monotonic() < deadline:
        time.sleep(0.005)
