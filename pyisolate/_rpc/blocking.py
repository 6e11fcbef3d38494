"""Blocking views of remote objects, for code that is not async (threads, plain methods).

Safe to import in a worker: nothing host-only here.
"""

from __future__ import annotations

import _thread
import asyncio
import inspect
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


class _Outcome:
    """What a coroutine run for a blocked thread ended with; ``done`` is released when it is known."""

    __slots__ = ("done", "error", "task", "value")

    def __init__(self) -> None:
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None


async def _deliver(coro: Coroutine[Any, Any, Any], outcome: _Outcome) -> None:
    """Run ``coro`` on the loop and wake the blocked thread from its last step (no extra callback)."""
    try:
        outcome.value = await coro
    except BaseException as exc:  # the thread receives it, cancellation included
        outcome.error = exc
        if not isinstance(exc, (Exception, asyncio.CancelledError)):
            raise  # KeyboardInterrupt, SystemExit: the loop's too
    finally:
        outcome.done.release()


def block(loop: asyncio.AbstractEventLoop, what: str, coro: Coroutine[Any, Any, Any],
          timeout: float | None = None) -> Any:
    """Run ``coro`` on ``loop`` (another thread's) and return its result, blocking this thread.

    One hand-off each way: a callback scheduled on the loop starts the task, and the task's
    last step releases a lock this thread waits on (``run_coroutine_threadsafe`` would add a
    loop iteration and a ``concurrent.futures.Future`` with its condition variable). A
    ``timeout``, or an interrupt (Ctrl-C) while waiting, cancels the task.
    """
    try:
        _refuse_in_loop(what)
    except RuntimeError:
        coro.close()
        raise
    outcome = _Outcome()

    def start() -> None:
        outcome.task = loop.create_task(_deliver(coro, outcome))

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # the loop is closed
        coro.close()
        raise
    try:
        if not outcome.done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"{what} had no answer within {timeout} s")
    except BaseException:
        try:
            loop.call_soon_threadsafe(_cancel, outcome, coro)
        except RuntimeError:  # the loop closed meanwhile: nothing runs it any more
            pass
        raise
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def _cancel(outcome: _Outcome, coro: Coroutine[Any, Any, Any]) -> None:
    """On the loop: the blocked thread stopped waiting, so its task stops too."""
    task = outcome.task
    if task is None or task.done():
        return
    if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
        coro.close()  # cancelled before its first step, ``_deliver`` never awaits it
    task.cancel()


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


