"""Synchronous facades: for hosts that are not async, and for plain (threaded) extension code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from ._config import ExtensionConfig, ExtensionManagerConfig
from ._extension import Extension
from ._manager import ExtensionManager
from ._refs import ActorProxy, RefProxy

__all__ = ["SyncExtensionManager", "sync"]

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


def _block(loop: asyncio.AbstractEventLoop, what: str, coro: Coroutine[Any, Any, Any],
           timeout: float | None = None) -> Any:
    try:
        _refuse_in_loop(what)
    except RuntimeError:
        coro.close()
        raise
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class _Blocking:
    """A view of a remote object whose methods block and return the result."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._target, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            async def run() -> Any:
                return await method(*args, **kwargs)

            return _block(self._loop, f"{name}()", run())

        call.__name__ = name
        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = self._target

        async def run() -> Any:
            return await target(*args, **kwargs)

        return _block(self._loop, "calling a remote callable", run())

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"


def sync(target: Any) -> Any:
    """A blocking view of a proxy, callback or extension handle, for code that is not async.

    ``pyisolate.sync(DatabaseAPI()).get("k")`` returns the value itself. Use it in plain
    (threaded) extension methods and in threads of the host; inside a running event loop it
    raises RuntimeError instead of deadlocking.
    """
    if isinstance(target, (ActorProxy, RefProxy)):
        return _Blocking(target, target._pyisolate_call.__self__.loop)  # type: ignore[attr-defined]
    if isinstance(target, Extension):
        backend = target._pyisolate_backend
        manager = getattr(backend, "_manager", None)
        loop = manager.loop if manager is not None else None
        if loop is None:
            raise TypeError("pyisolate.sync() of an isolated=False extension: call its methods directly")
        return _Blocking(target, loop)
    raise TypeError(f"pyisolate.sync() takes a proxy, callback or extension handle, not {type(target).__name__}")


class SyncExtensionManager:
    """ExtensionManager for hosts that are not async: every call blocks and returns its result.

    It runs the manager on an event loop in a thread of its own. Use it as a context manager
    or call ``stop_all()``. Its methods cannot be used inside a running event loop: async hosts
    use ``ExtensionManager`` and ``await``.
    """

    def __init__(self, extension_type: type[Any], config: ExtensionManagerConfig) -> None:
        self._manager: ExtensionManager[Any] = ExtensionManager(extension_type, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pyisolate-sync", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self, what: str, coro: Coroutine[Any, Any, Any]) -> Any:
        return _block(self._loop, f"SyncExtensionManager.{what}", coro)

    def load_extension(self, config: ExtensionConfig) -> Any:
        """Load an extension and wait until it is ready; its methods then return results directly."""

        async def load() -> Extension:
            return await self._manager.load_extension(config)

        return _Blocking(self._run("load_extension()", load()), self._loop)

    def get_actor(self, name: str | type) -> Any:
        """A blocking handle to an extension or singleton by name."""

        async def get() -> Any:
            return self._manager.get_actor(name)

        return _Blocking(self._run("get_actor()", get()), self._loop)

    def on_event(self, name: str, handler: Callable[[str, Any], Any]) -> None:
        """See ExtensionManager.on_event; handlers run on the manager's own loop thread."""

        async def add() -> None:
            self._manager.on_event(name, handler)

        self._run("on_event()", add())

    def stop_all(self) -> None:
        """Stop every extension and the manager's thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run("stop_all()", self._manager.stop_all())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    close = stop_all

    def __enter__(self) -> SyncExtensionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
