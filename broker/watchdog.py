"""Make a blocked event loop visible: log what blocked it, with the loop thread's stack.

The broker shares the host's event loop (a host call costs one send and one receive, with
no thread hand-off). The price is that a loop blocked by host code also stops routing
between extensions, so a blocked loop must never be silent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

__all__ = ["LoopWatchdog"]

logger = logging.getLogger("pyisolate.broker")


class LoopWatchdog:
    """Warn when ``loop`` has not run a callback for ``threshold`` seconds.

    A timer on the loop stamps the time; a daemon thread compares. One warning per
    blocked stretch, carrying the stack of the loop's thread at the moment of detection.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float) -> None:
        self._loop = loop
        self._threshold = threshold
        self._interval = max(threshold / 4, 0.01)
        self._last = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._timer: asyncio.TimerHandle | None = loop.call_later(self._interval, self._tick)
        self.warnings = 0
        self._thread = threading.Thread(target=self._watch, name="pyisolate-loop-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching; idempotent. Must be called from the loop's thread."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread.is_alive() and threading.get_ident() != self._thread.ident:
            self._thread.join()

    def _tick(self) -> None:
        self._last = time.monotonic()
        if not self._stop.is_set():
            self._timer = self._loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        warned_for = 0.0
        while not self._stop.wait(self._interval):
            last = self._last
            blocked = time.monotonic() - last
            if blocked < self._threshold + self._interval or warned_for == last:
                continue
            if self._loop.is_closed() or not self._loop.is_running():
                continue
            warned_for = last
            self.warnings += 1
            frame = sys._current_frames().get(self._loop_thread)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
            logger.warning(
                "event loop blocked for %.2f s: pyisolate cannot route messages between "
                "extensions or answer them while the host's loop is blocked; run blocking "
                "work with asyncio.to_thread(). The loop's thread is at:\n%s",
                blocked,
                stack,
            )
