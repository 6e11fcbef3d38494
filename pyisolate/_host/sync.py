"""SyncExtensionManager: the manager for hosts that are not async."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .._config import ExtensionConfig, ExtensionManagerConfig
from .._rpc import Blocking, block
from ..errors import LoadExtensionsError
from .extension import Extension
from .manager import ExtensionManager

__all__ = ["SyncExtensionManager"]


class SyncExtensionManager:
    """ExtensionManager for hosts that are not async: every call blocks and returns its result.

    It runs the manager on an event loop in a thread of its own. Use it as a context manager
    or call ``stop_all()``. Its methods cannot be used inside a running event loop: async hosts
    use ``ExtensionManager`` and ``await``.
    """

    def __init__(self, extension_type: type[Any], config: ExtensionManagerConfig | Mapping[str, Any]) -> None:
        self._manager: ExtensionManager[Any] = ExtensionManager(extension_type, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pyisolate-sync", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self, what: str, coro: Coroutine[Any, Any, Any]) -> Any:
        return block(self._loop, f"SyncExtensionManager.{what}", coro)

    def load_extension(self, config: ExtensionConfig | Mapping[str, Any]) -> Any:
        """Load an extension and wait until it is ready; its methods then return results directly."""

        async def load() -> Extension:
            return await self._manager.load_extension(config)

        return Blocking(self._run("load_extension()", load()), self._loop)

    def load_extensions(self, configs: Iterable[ExtensionConfig | Mapping[str, Any]]) -> dict[str, Any]:
        """Load several extensions concurrently; see ``ExtensionManager.load_extensions``.

        The handles (also those in ``LoadExtensionsError.loaded``) return results directly.
        """
        configs = list(configs)

        async def load() -> dict[str, Extension]:
            return await self._manager.load_extensions(configs)

        try:
            loaded = self._run("load_extensions()", load())
        except LoadExtensionsError as exc:
            exc.loaded = {name: Blocking(handle, self._loop) for name, handle in exc.loaded.items()}
            raise
        return {name: Blocking(handle, self._loop) for name, handle in loaded.items()}

    @property
    def extensions(self) -> Mapping[str, Any]:
        """See ExtensionManager.extensions; the handles return results directly."""

        async def snapshot() -> Mapping[str, Extension]:
            return self._manager.extensions

        handles = self._run("extensions", snapshot())
        return MappingProxyType({name: Blocking(handle, self._loop) for name, handle in handles.items()})

    def stats(self) -> dict[str, Any]:
        """See ExtensionManager.stats (it only reads, so it does not wait for the manager's loop)."""
        return self._manager.stats()

    def get_actor(self, name: str | type) -> Any:
        """A blocking handle to an extension or singleton by name."""

        async def get() -> Any:
            return self._manager.get_actor(name)

        return Blocking(self._run("get_actor()", get()), self._loop)

    def on_event(self, name: str, handler: Callable[[str, Any], Any]) -> None:
        """See ExtensionManager.on_event; handlers run on the manager's own loop thread."""

        async def add() -> None:
            self._manager.on_event(name, handler)

        self._run("on_event()", add())

    def prestart(self, wait: bool = True) -> None:
        """See ExtensionManager.prestart; with ``wait=False``, return at once while it starts (a
        failure to start is logged, and share_torch extensions are then spawned)."""
        if wait:
            self._run("prestart()", self._manager.prestart())
        else:
            asyncio.run_coroutine_threadsafe(self._manager.prestart(), self._loop)

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

    def stop_all_extensions(self) -> None:
        """``stop_all()``, by the name pyisolate 0.10 gave it."""
        self.stop_all()

    def __enter__(self) -> SyncExtensionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
