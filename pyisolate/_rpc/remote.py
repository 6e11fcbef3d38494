"""Async generators across processes, with credit-based flow control.

The caller's CALL is answered ``RESULT "stream"``; the producer then sends ITEM messages,
at most ``WINDOW`` ahead of what the consumer has taken, and END (or ERROR) at the end. The
consumer grants more with CREDIT as it takes items, so a slow consumer slows the producer
and both sides buffer at most ``WINDOW`` items. Closing the consumer early (``break`` drops
it, or ``aclose()``) sends CLOSE, and the producer closes the generator: its ``finally`` runs.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

__all__ = ["WINDOW", "Producer", "RemoteCall", "RemoteStream"]

#: Items in flight per stream: the producer's lead over the consumer.
WINDOW = 16


class Producer:
    """Drive one async generator for one remote consumer. Owned by the serving endpoint."""

    def __init__(
        self,
        agen: AsyncGenerator[Any, None],
        send_item: Callable[[object], None],
        send_end: Callable[[], None],
        send_error: Callable[[BaseException], None],
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[], None],
    ) -> None:
        self._agen = agen
        self._send_item, self._send_end, self._send_error = send_item, send_end, send_error
        self._credit = WINDOW
        self._wake = asyncio.Event()
        self._on_done = on_done
        self.task = loop.create_task(self._run())

    def grant(self, count: int) -> None:
        """The consumer has taken ``count`` more items."""
        self._credit += count
        self._wake.set()

    def close(self) -> None:
        """The consumer is gone: stop and close the generator."""
        self.task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                while self._credit <= 0:
                    self._wake.clear()
                    await self._wake.wait()
                try:
                    item = await self._agen.__anext__()
                except StopAsyncIteration:
                    self._send_end()
                    return
                self._credit -= 1
                self._send_item(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._send_error(exc)
        finally:
            try:
                await self._agen.aclose()
            finally:
                self._on_done()


class RemoteStream:
    """The consumer's side: an async iterator over a generator in another actor.

    It lives on its endpoint's loop; consumed from another loop, each step is handed over.
    """

    def __init__(self, grant: Callable[[int], None], close: Callable[[], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None
        self._taken = 0
        self._credit = WINDOW  # items the producer may still send: the consumer's mirror of its count
        self._grant = grant
        self._finalizer = weakref.finalize(self, close)  # dropped early: tell the producer

    def may_push(self) -> bool:
        """Whether the producer had credit for one more item (a well-behaved one always does)."""
        return self._credit > 0

    def push(self, item: object) -> None:
        """An item arrived."""
        self._credit -= 1
        self._items.append(item)
        self._ready.set()

    def end(self, error: BaseException | None = None) -> None:
        """The generator finished (or raised ``error``)."""
        self._done, self._error = True, error
        self._finalizer.detach()
        self._ready.set()

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> Any:
        if asyncio.get_running_loop() is not self._loop:  # consumed from another loop or thread
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._next(), self._loop))
        return await self._next()

    async def _next(self) -> Any:
        while not self._items:
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._taken += 1
        if self._taken >= WINDOW // 2 and not self._done:
            self._credit += self._taken
            self._grant(self._taken)
            self._taken = 0
        return item

    async def aclose(self) -> None:
        """Stop consuming; the remote generator is closed (its ``finally`` runs)."""
        if asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.aclose(), self._loop))
        if not self._done:
            self._done = True
            self._items.clear()
            self._finalizer()

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RemoteCall:
    """The result of calling a remote method: await it, or ``async for`` over it for a stream.

    Nothing is sent until it is awaited or iterated.
    """

    __slots__ = ("_start", "_stream", "_timeout")

    def __init__(self, start: Callable[[float | None], Any]) -> None:
        self._start = start  # start(timeout) -> coroutine of the call
        self._stream: Any = None
        self._timeout: float | None = None

    def timeout(self, seconds: float | None) -> RemoteCall:
        """Answer within ``seconds`` or raise CallTimeoutError (overrides the manager's default)."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a call timeout must be a positive number of seconds, got {seconds!r}")
        self._timeout = seconds
        return self

    def __await__(self) -> Any:
        return self._start(self._timeout).__await__()

    def __aiter__(self) -> RemoteCall:
        return self

    async def __anext__(self) -> Any:
        if self._stream is None:
            self._stream = await self._start(self._timeout)
            if not hasattr(self._stream, "__anext__"):
                raise TypeError(f"the remote method returned {type(self._stream).__name__}, not a stream")
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        """Close the stream early (its remote ``finally`` runs)."""
        if self._stream is not None and hasattr(self._stream, "aclose"):
            await self._stream.aclose()
