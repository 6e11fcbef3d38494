"""CallCount: the calls in flight through one worker, and the wait for them to end (reload's drain)."""

from __future__ import annotations

import asyncio
import threading

__all__ = ["CallCount"]


class CallCount:
    """Count calls into one worker; once it is retired, refuse new ones and wait for the rest.

    Callers may be on other threads (their own event loops, ``pyisolate.sync``), so the count
    is kept under a lock, and a retired count is read after counting: a call either is counted
    before the drain looks (and the drain waits for it), or sees the retirement and is not
    counted (its caller sends it elsewhere). Waiting happens on ``loop``, the manager's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self.open = 0
        self.retired = False
        self._idle: asyncio.Event | None = None  # made on retire(), on the loop

    def enter(self) -> bool:
        """Count a call; False (and not counted) once retired."""
        with self._lock:
            self.open += 1
        if self.retired:  # read after the count: a drain that saw 0 had set it first
            self.leave()
            return False
        return True

    def leave(self) -> None:
        """A call counted by ``enter`` has ended."""
        with self._lock:
            self.open -= 1
            idle = self.open == 0 and self._idle is not None
        if idle:
            assert self._idle is not None
            self._loop.call_soon_threadsafe(self._idle.set)

    def retire(self) -> None:
        """Refuse new calls from now on; call on the loop."""
        self._idle = asyncio.Event()
        self.retired = True

    async def drain(self, timeout: float) -> bool:
        """Wait until the counted calls have ended, at most ``timeout`` seconds; say whether they did."""
        assert self._idle is not None, "retire() first"
        try:
            async with asyncio.timeout(timeout):
                while self.open:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True
