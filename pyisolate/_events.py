"""Events from extensions: handlers, and one ordered, bounded queue per emitting extension."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

__all__ = ["Events"]

logger = logging.getLogger("pyisolate")


class Events:
    """Event handlers, and one ordered, bounded queue (with its task) per emitting extension.

    Emitters never wait (events are fire-and-forget), so a queue that fills up because the
    handlers are slower than the emitter drops the newest events: counted in ``dropped`` and
    logged as a warning once per overflow, never silently.
    """

    LIMIT = 10_000

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.handlers: dict[str, list[Any]] = {}
        self._queues: dict[str, asyncio.Queue[tuple[str, object]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        self._overflowing: set[str] = set()

    def put(self, sender: str, name: str, value: object) -> None:
        queue = self._queues.get(sender)
        if queue is None:
            queue = self._queues[sender] = asyncio.Queue(self.LIMIT)
            self._tasks.append(self._loop.create_task(self._run(sender, queue)))
        try:
            queue.put_nowait((name, value))
            self._overflowing.discard(sender)
        except asyncio.QueueFull:
            self.dropped += 1
            if sender not in self._overflowing:
                self._overflowing.add(sender)
                logger.warning("events from %r arrive faster than their handlers run: %d queued; "
                               "dropping new ones until the queue drains", sender, self.LIMIT)

    async def _run(self, sender: str, queue: asyncio.Queue[tuple[str, object]]) -> None:
        while True:
            name, value = await queue.get()
            calls = [(h, value) for h in self.handlers.get(name, ())]
            calls += [(h, (name, value)) for h in self.handlers.get("*", ())]
            for handler, arg in calls:
                try:
                    result = handler(sender, arg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # no caller can receive it: the emitter did not wait
                    logger.exception("handler of event %r from %r failed", name, sender)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
