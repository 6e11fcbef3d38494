"""ExtensionManager: owns the broker, the worker processes and their shutdown."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import secrets
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Generic, TypeVar

from pyisolate.broker.protocol import HOST, Kind, pack_header
from pyisolate.broker.router import Broker
from pyisolate.workers.loader import class_spec, load_extension

from . import _shm, _venv
from ._base import ExtensionBase
from ._codec import DecodeError, decode_exception
from ._config import ExtensionConfig, ExtensionManagerConfig
from ._extension import Extension, LocalBackend
from ._rpc import Endpoint
from ._refs import ActorProxy
from ._singleton import ProxiedSingleton, actor_name
from ._process import WorkerProcess
from ._runtime import runtime_dir
from .errors import (
    ConfigError,
    ExtensionClosedError,
    ExtensionCrashedError,
    ExtensionLoadError,
    PyisolateError,
    UnroutableError,
)

__all__ = ["ExtensionManager"]

logger = logging.getLogger("pyisolate")

T = TypeVar("T", bound=ExtensionBase)


class _State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    CRASHED = "crashed"


def describe_exit(code: int | None) -> str:
    """Say how a process ended, in words."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code} (exit code {code})"
    return f"exited with code {code}"


class _Worker:
    """A remote extension as the manager sees it: its process, its state, its readiness."""

    def __init__(self, manager: ExtensionManager[Any], config: ExtensionConfig) -> None:
        self.name = config.name
        self.bname = config.name.encode()
        self.config = config
        self._manager = manager
        self.state = _State.STARTING
        self.process: WorkerProcess | None = None
        self.ready: asyncio.Future[None] = manager.loop.create_future()
        self._error: BaseException | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.ping_since: float | None = None  # when the oldest unanswered heartbeat was sent
        self.hung_for: float | None = None
        self._restarts: list[float] = []  # when each restart in the policy's window happened
        self._restarting: BaseException | None = None  # the crash being recovered from
        self.restart_count = 0
        self.start_task = manager.loop.create_task(self._start(), name=f"pyisolate-start-{self.name}")
        self.start_task.add_done_callback(_retrieve)

    # -- the Backend protocol ------------------------------------------------------------

    async def wait_ready(self) -> None:
        if asyncio.get_running_loop() is not self._manager.loop:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.wait_ready(), self._manager.loop)
            )
        await asyncio.shield(self.ready)
        if self.state is not _State.READY:
            raise self._unavailable()

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        if self.state is not _State.READY:
            policy = self.config.restart
            if self._restarting is not None and policy is not None and policy.calls_during_restart == "fail":
                raise self._restarting
            await self.wait_ready()
        return await self._manager.endpoint.remote_call(self.bname, method, args, kwargs, 0, timeout)

    async def stop(self) -> None:
        if asyncio.get_running_loop() is not self._manager.loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.stop(), self._manager.loop))
        if self._stop_task is None:
            self._stop_task = self._manager.loop.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    # -- life ----------------------------------------------------------------------------

    def _unavailable(self) -> BaseException:
        if self.state in (_State.STOPPING, _State.STOPPED):
            return ExtensionClosedError(f"extension {self.name!r} is stopped")
        assert self._error is not None
        return self._error

    async def _start(self) -> None:
        manager, config = self._manager, self.config
        try:
            python = await _venv.ensure_venv(
                venv_root=manager.config.venv_root,
                name=self.name,
                dependencies=config.dependencies,
                share_torch=config.share_torch,
                allow_direct_references=config.allow_direct_references,
                progress=manager.config.on_progress,
            )
            runtime = await asyncio.to_thread(runtime_dir, manager.config.venv_root, config.share_torch)
            secret = secrets.token_bytes(32)
            manager.broker.registry.expect(self.bname, secret)
            started = time.monotonic()
            self.process = await WorkerProcess.spawn(
                name=self.name,
                python=python,
                runtime=runtime,
                boot={
                    "name": self.name,
                    "endpoint": manager.broker.endpoint,
                    "secret": secret.hex(),
                    "module_path": str(config.module_path),
                    "extension_class": manager.extension_spec,
                    "apis": [class_spec(api) for api in config.apis],
                    "session": _shm.session(),
                    "host_actors": ["host", *(n.decode() for n in manager.singleton_names())],
                    "handshake_timeout": manager.config.start_timeout,
                    "log_level": logging.getLevelName(logging.getLogger("pyisolate").getEffectiveLevel()),
                },
                pass_env=tuple(config.pass_env),
                env=dict(config.env),
            )
            self._watch = manager.loop.create_task(self._watch_exit(self.process))
            try:
                async with asyncio.timeout(manager.config.start_timeout):
                    await asyncio.shield(self.ready)
            except TimeoutError:
                raise ExtensionLoadError(
                    f"extension {self.name!r} did not become ready within "
                    f"{manager.config.start_timeout:.0f} s (ExtensionManagerConfig.start_timeout)",
                    extension=self.name,
                    remote_traceback=self.process.stderr_tail(),
                ) from None
            logger.debug("extension %r ready in %.3f s (pid %d)", self.name, time.monotonic() - started,
                         self.process.pid)
        except BaseException as exc:
            if self.state is _State.STARTING:
                self._fail(_State.FAILED, exc if isinstance(exc, Exception) else ExtensionClosedError(
                    f"loading extension {self.name!r} was cancelled"))
            await self._release()
            raise

    def on_control(self, kind: Kind, body: bytes, buffers: list[bytes]) -> None:
        """READY or LOAD_FAILED from the worker."""
        if self.state is not _State.STARTING:
            return
        if kind is Kind.READY:
            self.state = _State.READY
            self._restarting = None
            self._manager.start_heartbeats()
            if not self.ready.done():
                self.ready.set_result(None)
            return
        try:
            remote = decode_exception(body, buffers)
            text = f"{type(remote).__name__}: {remote}"
            tb = getattr(remote, "remote_traceback", "")
        except DecodeError as exc:
            text, tb = f"undecodable failure report: {exc}", ""
        self._fail(_State.FAILED, ExtensionLoadError(
            f"extension {self.name!r} failed to load: {text}", extension=self.name, remote_traceback=tb))

    def _fail(self, state: _State, exc: BaseException) -> None:
        self.state = state
        self._error = exc
        if not self.ready.done():
            self.ready.set_result(None)  # waiters look at state and _error
        self._manager.fail_peer(self.bname, exc)
        self._manager.broker.registry.forget(self.bname)

    async def _watch_exit(self, process: WorkerProcess) -> None:
        code = await process.wait()
        if self.state in (_State.STOPPING, _State.STOPPED, _State.FAILED):
            return
        _shm.sweep(self.name)  # the names it held; before anyone hears of the crash
        how = describe_exit(code)
        if self.hung_for is not None:
            how = f"stopped answering heartbeats for {self.hung_for:.1f} s and was killed ({how})"
        tail = process.stderr_tail()
        if self.state is _State.STARTING:
            self._fail(_State.FAILED, ExtensionLoadError(
                f"extension {self.name!r} {how} before it was ready", extension=self.name, remote_traceback=tail))
        else:
            logger.warning("extension %r %s", self.name, how)
            crash = ExtensionCrashedError(
                f"extension {self.name!r} {how}", extension=self.name, exit_code=code, stderr_tail=tail)
            delay = self._restart_delay()
            if delay is None:
                if self.config.restart is not None:
                    crash = ExtensionCrashedError(
                        f"{crash.args[0]}; it crashed more than {self.config.restart.max_restarts} times within "
                        f"{self.config.restart.within:.0f} s and is marked failed until it is loaded again",
                        extension=self.name, exit_code=code, stderr_tail=tail)
                self._fail(_State.CRASHED, crash)
            else:
                self._begin_restart(crash, delay)
        await process.aclose()

    def _restart_delay(self) -> float | None:
        """Seconds to wait before restarting, or None if the policy says no (more) restarts."""
        policy = self.config.restart
        if policy is None or self._manager._closing:
            return None
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < policy.within]
        if len(self._restarts) >= policy.max_restarts:
            return None
        self._restarts.append(now)
        delay: float = min(policy.backoff * 2 ** (len(self._restarts) - 1), policy.max_backoff)
        return delay

    def _begin_restart(self, crash: ExtensionCrashedError, delay: float) -> None:
        """Fail what was pending (at-most-once), then start a new worker under the same name."""
        self._manager.fail_peer(self.bname, crash)
        self._manager.broker.registry.forget(self.bname)
        self._restarting = crash
        self.restart_count += 1
        self.state = _State.STARTING
        self.ready = self._manager.loop.create_future()
        self.ping_since = self.hung_for = None
        logger.warning("restarting extension %r in %.2f s (restart %d of %d within %.0f s)", self.name, delay,
                       len(self._restarts), self.config.restart.max_restarts if self.config.restart else 0,
                       self.config.restart.within if self.config.restart else 0)
        self.start_task = self._manager.loop.create_task(self._restart_after(delay), name=f"pyisolate-restart-{self.name}")
        self.start_task.add_done_callback(_retrieve)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)  # the policy's backoff
        await self._start()

    async def _stop(self) -> None:
        if not self.start_task.done():
            self.start_task.cancel()
            await asyncio.gather(self.start_task, return_exceptions=True)
        was_ready = self.state is _State.READY
        self.state = _State.STOPPING
        self._manager.fail_peer(self.bname, ExtensionClosedError(f"extension {self.name!r} was stopped"))
        if was_ready and self.process is not None and self.process.returncode is None:
            try:
                async with asyncio.timeout(self._manager.config.stop_timeout):
                    await self._manager.endpoint.request_stop(self.bname)
            except TimeoutError:
                logger.warning("extension %r did not finish stop() within %.1f s", self.name,
                               self._manager.config.stop_timeout)
            except PyisolateError as exc:
                logger.warning("extension %r: stop failed: %s", self.name, exc)
            except Exception as exc:  # the extension's own stop() raised; it still goes away
                logger.warning("extension %r: stop() raised %r", self.name, exc)
        if self.process is not None:
            await self.process.stop(self._manager.config.stop_timeout)
        await self._release()
        self.state = _State.STOPPED

    async def _release(self) -> None:
        self._manager.broker.registry.forget(self.bname)
        self._manager.forget(self)
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
        if self.process is not None:
            await self.process.aclose()
            _shm.sweep(self.name)  # names the worker left (its memory goes with its mappings)
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's exception as seen: it reaches callers through the handle."""
    if not task.cancelled():
        task.exception()


class ExtensionManager(Generic[T]):
    """Load extensions into their own venvs and processes, and stop them.

    Args:
        extension_type: ``ExtensionBase`` or the application's own subclass. An extension
            module may define its own subclass of it, which then serves the calls.
        config: Settings shared by every extension.

    Use it as an async context manager, or call ``stop_all()`` when done.
    """

    def __init__(self, extension_type: type[T], config: ExtensionManagerConfig) -> None:
        if not (isinstance(extension_type, type) and issubclass(extension_type, ExtensionBase)):
            raise ConfigError(
                f"ExtensionManager needs ExtensionBase or a subclass of it, got {extension_type!r}"
            )
        if not isinstance(config, ExtensionManagerConfig):
            raise ConfigError(f"ExtensionManager needs an ExtensionManagerConfig, got {config!r}")
        self.extension_type = extension_type
        self.config = config
        try:
            self.extension_spec = class_spec(extension_type)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._endpoint: Endpoint | None = None
        self._singletons: dict[bytes, Endpoint] = {}
        self._chain_loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._events: _Events | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._extensions: dict[str, _Worker | LocalBackend] = {}
        self._closing = False

    # -- loop-bound parts, created on first use --------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def broker(self) -> Broker:
        assert self._broker is not None
        return self._broker

    @property
    def endpoint(self) -> Endpoint:
        assert self._endpoint is not None
        return self._endpoint

    def _bind(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "ExtensionManager.load_extension() must be called from async code (a running "
                "event loop), e.g. inside asyncio.run(main())"
            ) from None
        if self._loop is None:
            self._loop = loop
            _shm.configure_host()
            self._broker = Broker(block_warning=self.config.loop_block_warning)
            self._endpoint = self._host_actor(HOST, None, self._on_control)
            self._endpoint.default_timeout = self.config.call_timeout
            self._endpoint.max_in_flight = self.config.max_in_flight
            self._endpoint.answers_heartbeats = False  # ours are answers: they go to _on_control
            self._events = _Events(loop)
        elif loop is not self._loop:
            raise RuntimeError(
                "load_extension() must be called on the event loop the manager started on; "
                "calls to loaded extensions work from any loop or thread"
            )

    # -- public API ------------------------------------------------------------------------

    def load_extension(self, config: ExtensionConfig) -> Extension:
        """Start loading an extension and return its handle at once.

        ``await`` the handle (or the call) to wait until it is ready; calls made before then
        wait for it. Loading errors (venv build, import, start-up) surface there.

        Raises:
            ConfigError: ``config`` is not an ExtensionConfig or its name is in use.
            ExtensionClosedError: the manager is stopped.
        """
        if not isinstance(config, ExtensionConfig):
            raise ConfigError(f"load_extension() needs an ExtensionConfig, got {config!r}")
        if self._closing:
            raise ExtensionClosedError("this ExtensionManager is stopped")
        self._bind()
        if config.name in self._extensions or self.broker.has_actor(config.name.encode()):
            raise ConfigError(
                f"an extension named {config.name!r} is already loaded; stop it first or choose another name"
            )
        for api in config.apis:
            self._add_singleton(api)
        backend: _Worker | LocalBackend
        if config.isolated:
            backend = _Worker(self, config)
        else:
            task = self.loop.create_task(load_extension(Path(config.module_path), self.extension_type))
            task.add_done_callback(_retrieve)
            backend = LocalBackend(config.name, task, self.forget)
        self._extensions[config.name] = backend
        return Extension(backend)

    async def stop_all(self) -> None:
        """Stop every extension concurrently and close the broker; idempotent."""
        self._closing = True
        if self._loop is None:
            return
        backends = list(self._extensions.values())
        await asyncio.gather(*(b.stop() for b in backends), return_exceptions=True)
        self._extensions.clear()
        assert self._events is not None
        await self._events.aclose()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
        await asyncio.gather(*(ep.aclose() for ep in [self.endpoint, *self._singletons.values()]))
        self.broker.close()

    aclose = stop_all

    async def __aenter__(self) -> ExtensionManager[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_loop", None) is not None and not getattr(self, "_closing", True):
            _warn(f"ExtensionManager {self!r} was not stopped; call stop_all()", ResourceWarning, source=self)

    # -- internals -------------------------------------------------------------------------

    def get_actor(self, name: str | type[ProxiedSingleton]) -> Any:
        """A handle to the actor ``name``: a loaded extension or a shared singleton.

        Raises:
            UnroutableError: no actor of that name.
        """
        if isinstance(name, type):
            name = actor_name(name)
        backend = self._extensions.get(name)
        if backend is not None:
            return Extension(backend)
        if self._loop is not None and name.encode() in self._singletons:
            return ActorProxy(name.encode(), self.endpoint.remote_call)
        known = sorted([*self._extensions, *(n.decode() for n in self._singletons)])
        raise UnroutableError(f"no actor named {name!r}; known actors: {', '.join(known) or 'none'}")

    def on_event(self, name: str, handler: Any) -> None:
        """Call ``handler(extension_name, value)`` for each event ``name`` an extension emits.

        Handlers of one sender run one at a time, in the order the events were emitted, on
        the manager's event loop; the emitter never waits for them. A handler may be a plain
        function or a coroutine function; ``"*"`` receives every event as (sender, (name, value)).
        """
        self._bind_for_events()
        assert self._events is not None
        self._events.handlers.setdefault(name, []).append(handler)

    def _bind_for_events(self) -> None:
        if self._loop is None:
            self._bind()

    def singleton_names(self) -> list[bytes]:
        """Actor names of the shared singletons registered so far."""
        return list(self._singletons)

    def fail_peer(self, name: bytes, exc: BaseException) -> None:
        """Extension ``name`` is gone: every host-side actor drops what concerned it."""
        for endpoint in [self.endpoint, *self._singletons.values()]:
            endpoint.fail_peer(name, exc)

    def _host_actor(self, name: bytes, root: object, on_control: Any = None) -> Endpoint:
        broker = self.broker

        def send(dest: bytes, frames: list[Any]) -> None:
            broker.send(dest, name, frames)

        endpoint = Endpoint(name, self.loop, send, root=root, origin=HOST, chain_loops=self._chain_loops,
                            on_control=on_control)
        broker.add_local(name, endpoint.on_frames)
        return endpoint

    def _add_singleton(self, api: type[ProxiedSingleton]) -> None:
        name = actor_name(api).encode()
        endpoint = self._singletons.get(name)
        if endpoint is not None:
            if type(endpoint.root) is not api:
                raise ConfigError(f"two singleton classes are named {name.decode()!r}; rename one")
            return
        if self.broker.has_actor(name):
            raise ConfigError(f"the singleton name {name.decode()!r} is taken by an extension; rename one")
        self._singletons[name] = self._host_actor(name, api())

    def forget(self, backend: _Worker | LocalBackend) -> None:
        if self._extensions.get(backend.name) is backend:
            del self._extensions[backend.name]

    def start_heartbeats(self) -> None:
        """Check every ready worker's liveness from now on (once per manager)."""
        if self._heartbeats is None and not self._closing:
            self._heartbeats = self.loop.create_task(self._beat(), name="pyisolate-heartbeats")

    async def _beat(self) -> None:
        """Ping each ready worker; kill one whose ping stays unanswered for heartbeat_timeout.

        A ping is answered by the worker's event loop, so a worker stuck in C code holding the
        GIL, or with a blocked loop, stops answering. Only pings actually sent count: a host
        whose own loop was blocked does not blame its workers.
        """
        interval, limit = self.config.heartbeat_interval, self.config.heartbeat_timeout
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for backend in list(self._extensions.values()):
                if not isinstance(backend, _Worker) or backend.state is not _State.READY:
                    continue
                if backend.ping_since is None:
                    backend.ping_since = now
                elif now - backend.ping_since > limit and backend.process is not None:
                    backend.hung_for = now - backend.ping_since
                    logger.warning("extension %r stopped answering heartbeats for %.1f s: killing it",
                                   backend.name, backend.hung_for)
                    backend.process.kill()
                    continue
                self.endpoint._send_quiet(backend.bname, [pack_header(Kind.HEARTBEAT, 0), b""])

    def _on_control(self, sender: bytes, kind: Kind, call_id: int, extra: list[object], body: bytes,
                    buffers: list[bytes]) -> None:
        if kind is Kind.HEARTBEAT:
            beating = self._extensions.get(sender.decode(errors="replace"))
            if isinstance(beating, _Worker):
                beating.ping_since = None
            return
        if kind is Kind.EVENT:
            if extra and isinstance(extra[0], str) and self._events is not None:
                try:
                    value = self.endpoint._decode(body, buffers, sender)
                except Exception as exc:  # a bad event must not take the host down
                    logger.warning("undecodable event %r from %r: %s", extra[0], sender, exc)
                    return
                self._events.put(sender.decode(errors="replace"), extra[0], value)
            return
        backend = self._extensions.get(sender.decode(errors="replace"))
        if isinstance(backend, _Worker) and kind in (Kind.READY, Kind.LOAD_FAILED):
            backend.on_control(kind, body, buffers)


class _Events:
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
