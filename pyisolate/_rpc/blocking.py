"""Blocking views of remote objects, for code that is not async (threads, plain methods).

Safe to import in a worker: nothing host-only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

from .refs import ActorProxy, HandleProxy, RefProxy
from .remote import RemoteStream

__all__ = ["Blocking", "block", "sync"]

_IN_LOOP = (
    "{what} blocks until the answer comes, so it cannot run inside a running event loop (it would "
    "stall the loop or deadlock); in async code, await the call instead"
)


def _refuse_in_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(_IN_LOOP.format(what=what))


def block(loop: asyncio.AbstractEventLoop, what: str, coro: Coroutine[Any, Any, Any],
           timeout: float | None = None) -> Any:
    try:
        _refuse_in_loop(what)
    except RuntimeError:
        coro.close()
        raise
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _iterate(stream: RemoteStream, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    try:
        while True:
            try:
                yield block(loop, "iterating a stream", stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        block(loop, "closing a stream", stream.aclose())


class Blocking:
    """A view of a remote object whose methods block and return the result (its plain
    attributes, such as an extension handle's ``name``, are read as they are)."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        if not callable(method):  # a plain value of the handle (an extension's name, config, state)
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            async def run() -> Any:
                return await method(*args, **kwargs)

            result = block(self._loop, f"{name}()", run())
            if isinstance(result, RemoteStream):  # a stream: iterate it item by item, blocking
                return _iterate(result, self._loop)
            return result

        call.__name__ = name
        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = self._target

        async def run() -> Any:
            return await target(*args, **kwargs)

        return block(self._loop, "calling a remote callable", run())

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"


def sync(target: Any) -> Any:
    """A blocking view of a proxy, callback, object handle or extension handle, for code that is not async.

    ``pyisolate.sync(DatabaseAPI()).get("k")`` returns the value itself. Use it in plain
    (threaded) extension methods and in threads of the host; inside a running event loop it
    raises RuntimeError instead of deadlocking.
    """
    if isinstance(target, (ActorProxy, RefProxy, HandleProxy)):
        return Blocking(target, target._pyisolate_call.__self__.loop)  # type: ignore[attr-defined]
    # An extension handle (pyisolate._host) names the loop that serves it; looked up on the
    # type so that an object answering every attribute (a Blocking, say) is not taken for one.
    loop_of = getattr(type(target), "_pyisolate_sync_loop", None)
    if loop_of is not None:
        return Blocking(target, loop_of(target))
    raise TypeError(f"pyisolate.sync() takes a proxy, callback or extension handle, not {type(target).__name__}")


