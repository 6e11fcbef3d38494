"""Events from extensions: handlers, and one ordered, bounded queue per emitting extension."""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from typing import Any

__all__ = ["Events"]

logger = logging.getLogger("pyisolate")


class _Queue:
    """One sender's events waiting for their handlers, with their count and size."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[str, object, int]] = collections.deque()
        self.bytes = 0
        self.ready = asyncio.Event()
        self.overflowing = False


class Events:
    """Event handlers, and one ordered, bounded queue (with its task) per emitting extension.

    Emitters never wait (events are fire-and-forget), so a queue that fills up because the
    handlers are slower than the emitter drops the newest events, before they are even
    decoded: counted in ``dropped`` and logged as a warning once per overflow, never
    silently. A queue holds at most ``LIMIT`` events and ``BYTES`` bytes of them (one larger
    event is taken when the queue is empty, so any event that fits a message can arrive).
    """

    LIMIT = 10_000
    BYTES = 64 * 1024 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.handlers: dict[str, list[Any]] = {}
        self._queues: dict[str, _Queue] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    def admit(self, sender: str, size: int) -> bool:
        """Whether an event of ``size`` bytes from ``sender`` fits its queue; if not, count the drop."""
        queue = self._queues.get(sender)
        if queue is None or not queue.items:
            return True
        if len(queue.items) < self.LIMIT and queue.bytes + size <= self.BYTES:
            return True
        self.dropped += 1
        if not queue.overflowing:
            queue.overflowing = True
            logger.warning("events from %r arrive faster than their handlers run: %d events (%d bytes) queued; "
                           "dropping new ones until the queue drains", sender, len(queue.items), queue.bytes)
        return False

    def put(self, sender: str, name: str, value: object, size: int = 0) -> None:
        """Queue an event that ``admit`` let in."""
        queue = self._queues.get(sender)
        if queue is None:
            queue = self._queues[sender] = _Queue()
            self._tasks.append(self._loop.create_task(self._run(sender, queue)))
        queue.items.append((name, value, size))
        queue.bytes += size
        queue.overflowing = False
        queue.ready.set()

    async def _run(self, sender: str, queue: _Queue) -> None:
        while True:
            while not queue.items:
                queue.ready.clear()
                await queue.ready.wait()
            name, value, size = queue.items[0]
            calls = [(h, value) for h in self.handlers.get(name, ())]
            calls += [(h, (name, value)) for h in self.handlers.get("*", ())]
            try:
                for handler, arg in calls:
                    try:
                        result = handler(sender, arg)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:  # no caller can receive it: the emitter did not wait
                        logger.exception("handler of event %r from %r failed", name, sender)
            finally:
                queue.items.popleft()  # counted until its handlers are done with it
                queue.bytes -= size

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
