"""Extension: the host's handle on one loaded extension; its attributes are remote methods,
but for ``name``, ``config``, ``state``, ``stop`` and ``reload`` (``method()`` reaches an extension's own)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, Protocol

from .._base import ExtensionBase
from .._config import ExtensionConfig
from .._rpc import Blocking, CallStats, RemoteCall, resolve_method
from .._wire import Handle
from ..errors import CallTimeoutError, ConfigError, ExtensionClosedError

__all__ = ["Backend", "Extension", "LocalBackend", "method"]


class Backend(Protocol):
    """What runs an extension: a worker process, or the host itself (``isolated=False``)."""
    name: str

    @property
    def config(self) -> ExtensionConfig:
        """The ``ExtensionConfig`` it runs with."""

    @property
    def status(self) -> str:
        """starting, ready, stopping, stopped, failed or crashed."""

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Return an awaitable of ``method(*args, **kwargs)`` on the extension."""
    async def wait_ready(self) -> None:
        """Return once the extension is loaded; raise why it could not be."""
    async def stop(self) -> None:
        """Run the extension's stop hook and release it; idempotent."""


class _Method:
    """A method of the extension; calling it returns an awaitable of the result."""
    __slots__ = ("_backend", "_name")

    def __init__(self, backend: Backend, name: str) -> None:
        self._backend = backend
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> RemoteCall:
        return RemoteCall(functools.partial(self._backend.call, self._name, args, kwargs))

    def __repr__(self) -> str:
        return f"<remote method {self._name!r} of extension {self._backend.name!r}>"


class Extension:
    """A loaded (or loading) extension.

    Any public method of the extension's class is an attribute: ``await ext.method(...)``.
    The handle is awaitable: ``await ext`` waits until the extension is ready and returns
    it, so ``await manager.load_extension(cfg)`` and the un-awaited form both work.
    Framework attributes carry a ``_pyisolate_`` prefix so they cannot hide a method,
    except ``name``, ``config``, ``state``, ``stop()`` and ``reload()``: an extension's own
    method of one of those names is called with ``pyisolate.method(ext, "name")(...)``.
    """

    def __init__(self, backend: Backend) -> None:
        self._pyisolate_backend = backend

    @property
    def name(self) -> str:
        """The extension's name (``config.name``)."""
        return self._pyisolate_backend.name

    @property
    def config(self) -> ExtensionConfig:
        """The ``ExtensionConfig`` it was loaded with."""
        return self._pyisolate_backend.config

    @property
    def state(self) -> str:
        """Where it is in its life, now.

        ``"starting"`` (its venv, its process or its module is on the way; also while it
        restarts after a crash), ``"ready"`` (calls are served), ``"stopping"``,
        ``"stopped"``, ``"failed"`` (its load failed, or it crashed more often than its
        ``RestartPolicy`` allows) or ``"crashed"`` (its process died, with no restart). An
        ``isolated=False`` extension, which has no process, is ``"starting"`` while its module
        loads, then ``"ready"``, ``"failed"`` if the load raised, ``"stopped"`` once stopped.
        """
        return self._pyisolate_backend.status

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(f"{name!r}: only public methods of an extension can be called")
        method = _Method(self._pyisolate_backend, name)
        self.__dict__[name] = method  # next lookups skip __getattr__
        return method

    def __await__(self) -> Generator[Any, None, Extension]:
        yield from self._pyisolate_backend.wait_ready().__await__()
        return self

    async def stop(self) -> None:
        """Stop the extension: its ``stop()`` hook runs, then its process exits. Idempotent."""
        await self._pyisolate_backend.stop()

    async def reload(self, config: ExtensionConfig | Mapping[str, Any] | None = None) -> None:
        """Replace the extension's worker with a new one running its current code, dropping no call.

        Blue-green: a new worker starts beside the old one (its venv is rebuilt only if
        ``config`` changes the dependencies); once it is ready, new calls go to it; calls
        already running on the old worker finish there (for at most
        ``ExtensionManagerConfig.reload_drain_timeout``), then the old worker stops. Objects,
        callbacks and streams the old worker gave out fail from then on with
        ``ExtensionReloadedError``. Returns once the old worker is gone.

        Args:
            config: A new ``ExtensionConfig`` (or mapping) of the same name, e.g. with other
                dependencies; None keeps the current one.

        Raises:
            ExtensionLoadError: the new worker failed to load (import error, syntax error, a
                failing hook), with the remote traceback; the old worker serves on.
            EnvironmentBuildError: changed dependencies could not be installed; the old serves on.
            ConfigError: ``config`` is invalid, names another extension, or the extension is
                ``isolated=False`` (it runs in the host and cannot be reloaded).
            ExtensionClosedError: the extension is stopped.
        """
        reload = getattr(self._pyisolate_backend, "reload", None)
        if reload is None:
            raise ConfigError(f"extension {self.name!r} is isolated=False: it runs inside the host and cannot be "
                              "reloaded; load it with isolated=True to reload it")
        await reload(config)

    @property
    def _pyisolate_name(self) -> str:
        return self._pyisolate_backend.name

    def __repr__(self) -> str:
        return f"<Extension {self._pyisolate_backend.name!r}>"

    def _pyisolate_sync_loop(self) -> asyncio.AbstractEventLoop:
        """The loop that serves this handle, for ``pyisolate.sync()``."""
        manager = getattr(self._pyisolate_backend, "_manager", None)
        if manager is None:
            raise TypeError("pyisolate.sync() of an isolated=False extension: call its methods directly")
        loop: asyncio.AbstractEventLoop = manager.loop
        return loop


def method(extension: Extension | Blocking, name: str) -> Callable[..., Any]:
    """The extension's own method ``name``, even where the handle has an attribute of that name.

    ``ext.name``, ``ext.config``, ``ext.state``, ``ext.stop()`` and ``ext.reload()`` belong to the handle; an
    extension that defines a method so named is called with ``pyisolate.method(ext, "name")()``
    (awaited like any call; of a ``SyncExtensionManager``'s handle, it blocks and returns the
    result). Any other public method works too.

    Raises:
        TypeError: ``extension`` is not an extension handle.
        AttributeError: ``name`` is not a public method name (it starts with ``_``).
    """
    if isinstance(extension, Blocking) and isinstance(extension._target, Extension):
        return Blocking(method(extension._target, name), extension._loop)
    if not isinstance(extension, Extension):
        raise TypeError(f"pyisolate.method() needs an extension handle (from load_extension), got {extension!r}")
    if not isinstance(name, str) or not name or name.startswith("_"):
        raise AttributeError(f"{name!r}: only public methods of an extension can be called")
    return _Method(extension._pyisolate_backend, name)


class LocalBackend:
    """Runs an ``isolated=False`` extension inside the host process.

    Same API and the same hooks, in the same order; arguments are passed by reference.
    Plain methods run in a thread (as they would in a worker), coroutine methods on the loop.
    """

    def __init__(
        self, config: ExtensionConfig, load: asyncio.Task[ExtensionBase], on_stopped: Callable[[LocalBackend], None]
    ) -> None:
        self.name = config.name
        self.config = config
        self._load = load
        self._on_stopped = on_stopped
        self._stopped = False
        #: Counters of its calls, as for a worker (None: ExtensionManagerConfig.stats is off).
        self.call_stats: CallStats | None = None
        #: The host's ``Tracing`` (tracing on): each call is a span, current while it runs.
        self.tracing: Any = None

    @property
    def status(self) -> str:
        if self._stopped:
            return "stopped"
        if not self._load.done():
            return "starting"
        return "failed" if self._load.cancelled() or self._load.exception() is not None else "ready"

    async def wait_ready(self) -> None:
        await asyncio.shield(self._load)

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        if timeout is not None:
            try:
                async with asyncio.timeout(timeout):
                    return await self.call(method, args, kwargs)
            except TimeoutError:
                raise CallTimeoutError(f"{self.name}.{method}() took longer than {timeout} s") from None

        if self.call_stats is None and self.tracing is None:
            return await self._call(method, args, kwargs)
        stats, began = self.call_stats, time.perf_counter()
        try:
            if self.tracing is not None:
                with self.tracing.local(self.name, method):
                    result = await self._call(method, args, kwargs)
            else:
                result = await self._call(method, args, kwargs)
        except BaseException as exc:
            if stats is not None:
                stats.ended(method, time.perf_counter() - began, exc)
            raise
        if stats is not None:
            stats.ended(method, time.perf_counter() - began, None)
        return result

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._stopped:
            raise ExtensionClosedError(f"extension {self.name!r} is stopped")
        instance = await asyncio.shield(self._load)
        fn = resolve_method(instance, method)
        # In the host, by reference is what every value is: pyisolate.handle(obj) arrives as obj.
        args = tuple(arg.obj if type(arg) is Handle else arg for arg in args)
        kwargs = {key: arg.obj if type(arg) is Handle else arg for key, arg in kwargs.items()}
        if inspect.isasyncgenfunction(fn):
            return fn(*args, **kwargs)
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        result = await asyncio.to_thread(fn, *args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._on_stopped(self)
        if not self._load.done():
            self._load.cancel()
        await asyncio.gather(self._load, return_exceptions=True)
        if self._load.cancelled() or self._load.exception() is not None:
            return
        result = self._load.result().stop()
        if inspect.isawaitable(result):
            await result
