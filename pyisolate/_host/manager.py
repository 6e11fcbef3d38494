"""ExtensionManager: owns the broker, the worker processes and their shutdown."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from pyisolate.broker.delivery import nbytes
from pyisolate.broker.protocol import HOST, Kind, pack_header
from pyisolate.broker.router import Broker
from pyisolate.workers.loader import class_spec, load_extension

from .._base import ExtensionBase
from .._config import ExtensionConfig, ExtensionManagerConfig
from .._curve import CurveConfig
from .._envs import runtime_dir
from .._rpc import ActorProxy, CallStats, Endpoint
from .._singleton import ProxiedSingleton, actor_name
from .._upstream import config_from
from .._wire import encode_exception
from .._wire import shm as _shm
from ..errors import ConfigError, ExtensionClosedError, ExtensionReloadedError, LoadExtensionsError, UnroutableError
from .admin import AdminServer, admin_handler
from .apptypes import AppTypes, load_app_types
from .events import Events
from .extension import Extension, LocalBackend
from .generations import Generations
from .process import WorkerProcess
from .remote import RemoteProcess, check_remote
from .sandbox import resolve
from .stats import manager_stats
from .traces import HostTraces
from .watch import require_watchfiles
from .worker import State, Worker, retrieve
from .zygote import ForkServer, ForkServerError

__all__ = ["ExtensionManager"]

logger = logging.getLogger("pyisolate")

#: How long a worker whose connection closed may take to exit before it counts as cut off.
_CUT_OFF_GRACE = 2.0
#: Workers replaced by a reload that the host still names in ExtensionReloadedError (the oldest go first).
_REMEMBERED_RELOADS = 1024
#: Event names the manager itself sends (reload); refused from extensions, which cannot forge them.
_OWN_EVENTS = "pyisolate."

T = TypeVar("T", bound=ExtensionBase)


class ExtensionManager(Generic[T]):
    """Load extensions into their own venvs and processes, and stop them.

    Args:
        extension_type: ``ExtensionBase`` or the application's own subclass. An extension
            module may define its own subclass of it, which then serves the calls.
        config: Settings shared by every extension: an ``ExtensionManagerConfig``, or a
            mapping of its fields (``{"venv_root_path": ...}``), validated the same way.

    Use it as an async context manager, or call ``stop_all()`` when done.

    Raises:
        ConfigError: ``extension_type`` is not an ExtensionBase class, or ``config`` is
            invalid (a mapping's unknown key is named, with the closest known one).
    """

    def __init__(self, extension_type: type[T], config: ExtensionManagerConfig | Mapping[str, Any]) -> None:
        if not (isinstance(extension_type, type) and issubclass(extension_type, ExtensionBase)):
            raise ConfigError(
                f"ExtensionManager needs ExtensionBase or a subclass of it, got {extension_type!r}"
            )
        config = config_from(ExtensionManagerConfig, config, "ExtensionManager(config=...)")
        self.extension_type = extension_type
        self.config = config
        try:
            self.extension_spec = class_spec(extension_type)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        #: The application's registered types (``ExtensionManagerConfig.types``), or None.
        self.app_types: AppTypes | None = load_app_types(config.types) if isinstance(config.types, str) else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._endpoint: Endpoint | None = None
        self._singletons: dict[bytes, Endpoint] = {}
        self._chain_loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._events: Events | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._extensions: dict[str, Worker | LocalBackend] = {}  # the backend serving each extension now
        self._actors: dict[bytes, Worker] = {}  # every worker process by actor name (two per reload)
        self._reloaded: collections.OrderedDict[bytes, ExtensionReloadedError] = collections.OrderedDict()
        self._handles: dict[str, Extension] = {}  # one handle per loaded extension
        self._leaving: set[asyncio.Task[None]] = set()  # checks of workers whose connection closed
        self._closing = False
        self._zygote: asyncio.Task[ForkServer | None] | None = None  # the fork server, once asked for
        #: Spans of calls (``ExtensionManagerConfig.tracing``); None: tracing is off.
        self.traces: HostTraces | None = HostTraces() if config.tracing else None
        #: Counters of the calls host-side actors make, per extension (shared by their endpoints).
        self._call_stats: dict[bytes, CallStats] = {}
        self._admin: AdminServer | None = None
        #: The bound tcp endpoint of ``ExtensionManagerConfig.listen`` (its port chosen), once bound.
        self.listen_endpoint: str | None = None

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
            config = self.config
            _shm.configure_host()
            _shm.configure_pool(config.shm_pool_bytes)  # the latest manager's setting holds
            self._broker = Broker(block_warning=config.loop_block_warning, max_message_size=config.max_message_size,
                                  max_queued_bytes=config.max_queued_bytes, max_in_flight=config.max_in_flight)
            self._broker.on_leave(self._on_leave)
            if config.listen is not None:  # remote workers: tcp + CURVE (see docs/guides/remote.md)
                assert isinstance(config.curve, CurveConfig)
                self.listen_endpoint = self._broker.listen(
                    config.listen, server_secret=config.curve.server.secret.encode(), allowed=config.curve.allowed)
            self._endpoint = self._host_actor(HOST, None, self._on_control)
            self._endpoint.default_timeout = config.call_timeout
            self._endpoint.answers_heartbeats = False  # ours are answers: they go to _on_control
            self._endpoint.calls.why_gone = self._why_gone
            self._events = Events(loop)
            if config.uses_admin:
                self._start_admin()
        elif loop is not self._loop:
            raise RuntimeError(
                "load_extension() must be called on the event loop the manager started on; "
                "calls to loaded extensions work from any loop or thread"
            )

    def _start_admin(self) -> None:
        directory = self.broker.private_dir
        if directory is None:
            logger.warning("the admin endpoint is not served: this libzmq has no ipc, so the host has no private "
                           "directory to put its socket in")
            return
        self._admin = AdminServer(directory, admin_handler(self))
        logger.debug("admin endpoint listening on %s", self._admin.path)

    # -- public API ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What every loaded extension has done, as plain values (JSON-ready).

        Returns:
            ``{"pid": host pid, "time": when (epoch seconds), "counting": whether calls are
            counted (``ExtensionManagerConfig.stats``), "extensions": {name: snapshot}}``;
            each snapshot as ``pyisolate.stats(ext)`` describes it.
        """
        return manager_stats(self)

    @property
    def admin_path(self) -> str | None:
        """The admin endpoint's socket (see ``ExtensionManagerConfig.admin``), or None when not served."""
        return self._admin.path if self._admin is not None else None

    @property
    def extensions(self) -> Mapping[str, Extension]:
        """The extensions loaded (or loading) now: name -> handle, in load order.

        A read-only snapshot, taken when read: loading or stopping one later does not change
        it. An extension whose load failed may stay listed (``state == "failed"``) until it is
        stopped.
        """
        return MappingProxyType(dict(self._handles))

    def load_extension(self, config: ExtensionConfig | Mapping[str, Any]) -> Extension:
        """Start loading an extension and return its handle at once.

        ``await`` the handle (or the call) to wait until it is ready; calls made before then
        wait for it. Loading errors (venv build, import, start-up) surface there.

        Args:
            config: An ``ExtensionConfig``, or a mapping of its fields (as pyisolate 0.10
                hosts write it), validated exactly like ``ExtensionConfig(**config)``.

        Raises:
            ConfigError: ``config`` is invalid (a mapping's unknown key is named, with the
                closest known one), or its name is in use.
            ExtensionClosedError: the manager is stopped.
        """
        config = config_from(ExtensionConfig, config, "load_extension()")
        if self._closing:
            raise ExtensionClosedError("this ExtensionManager is stopped")
        if config.remote:
            check_remote(config, self.config)
        resolved = resolve(config, self.config)  # before anything starts: a wider policy is refused
        if not config.isolated and resolved.mode == "required":
            raise ConfigError(
                f"extension {config.name!r} has isolated=False, so it runs inside the host and cannot be confined, "
                "but its sandbox_mode is 'required'; set isolated=True, or sandbox_mode='preferred'"
            )
        watch = config.isolated and not config.remote and (self.config.watch if config.watch is None else config.watch)
        if watch:
            require_watchfiles(config.name)
        self._bind()
        self._check_name(config.name)
        for api in config.apis:
            self._add_singleton(api)
        backend: Worker | LocalBackend
        front: Generations | LocalBackend
        if config.isolated:
            front = Generations(self, config, resolved, watch=watch)
            backend = front.current
        else:
            task = self.loop.create_task(load_extension(Path(config.module_path), self.extension_type))
            task.add_done_callback(retrieve)
            backend = front = LocalBackend(config, task, self._forget)
            backend.call_stats = CallStats() if self.config.stats else None
            backend.tracing = self.traces.tracing() if self.traces is not None else None
        self._extensions[config.name] = backend
        if isinstance(backend, Worker) and self.config.stats:
            self._call_stats[backend.bname] = backend.call_stats
        handle = self._handles[config.name] = Extension(front)
        return handle

    async def load_extensions(self, configs: Iterable[ExtensionConfig | Mapping[str, Any]]) -> dict[str, Extension]:
        """Load several extensions concurrently; return once each is ready or has failed.

        Arguments (ExtensionConfigs or mappings of their fields) are checked before anything
        starts. Extensions that fail to load are released (their names are free again); the
        others stay loaded.

        Returns:
            Name -> ready Extension, in the order of ``configs``.

        Raises:
            ConfigError: an item is invalid, two share a name, or a name is already loaded;
                nothing was started.
            LoadExtensionsError: some failed; ``.loaded`` holds the ready ones, ``.failed``
                (and the group's exceptions) why each other one failed.
            ExtensionClosedError: the manager is stopped.

        If the call is cancelled, every extension it started is stopped.
        """
        checked = [config_from(ExtensionConfig, config, "load_extensions()") for config in configs]
        seen: set[str] = set()
        for config in checked:
            if config.name in seen:
                raise ConfigError(f"load_extensions(): two configs are named {config.name!r}; rename one")
            seen.add(config.name)
        if self._closing:
            raise ExtensionClosedError("this ExtensionManager is stopped")
        if not checked:
            return {}
        self._bind()
        for name in seen:
            self._check_name(name)
        handles: dict[str, Extension] = {}
        try:
            for config in checked:
                handles[config.name] = self.load_extension(config)
            outcomes = await asyncio.gather(*(self._ready(h) for h in handles.values()), return_exceptions=True)
        except BaseException:
            await asyncio.gather(*(h.stop() for h in handles.values()), return_exceptions=True)
            raise
        failed: dict[str, Exception] = {}
        for name, outcome in zip(handles, outcomes):
            if isinstance(outcome, Exception):
                failed[name] = outcome
            elif isinstance(outcome, BaseException):  # its start was cancelled from elsewhere
                failed[name] = ExtensionClosedError(f"loading extension {name!r} was cancelled")
                failed[name].__cause__ = outcome
        if not failed:
            return handles
        await asyncio.gather(*(handles[name].stop() for name in failed), return_exceptions=True)
        loaded = {name: handle for name, handle in handles.items() if name not in failed}
        raise LoadExtensionsError(f"{len(failed)} of {len(handles)} extensions failed to load",
                                  list(failed.values()), loaded=loaded, failed=dict(failed))

    def _check_name(self, name: str) -> None:
        """Actor names are one namespace: the host, its singletons and every extension."""
        if name in self._extensions:
            raise ConfigError(f"an extension named {name!r} is already loaded; stop it first or choose another name")
        bname = name.encode()  # (the host's own name is refused by ExtensionConfig already)
        if bname in self._singletons or self.broker.has_actor(bname):
            raise ConfigError(f"the extension name {name!r} is taken by a shared singleton (ProxiedSingleton) of "
                              "the host: actor names are one namespace; choose another name")

    @staticmethod
    async def _ready(handle: Extension) -> None:
        await handle

    async def prestart(self) -> None:
        """Start the fork server now, so that torch's import overlaps the application's own start-up.

        Optional: the first share_torch load starts it otherwise. Returns once it is ready (or
        has failed: share_torch extensions are then spawned, with one warning). Does nothing
        when ``ExtensionManagerConfig.fork_server`` is off. Call from the manager's event loop.
        """
        self._bind()
        if self.config.uses_fork_server and not self._closing:
            await self._fork_server_task()

    def _fork_server_task(self) -> asyncio.Future[ForkServer | None]:
        if self._zygote is None:
            self._zygote = self.loop.create_task(self._start_fork_server(), name="pyisolate-fork-server")
        return asyncio.shield(self._zygote)

    def _warm_fork_server(self) -> None:
        """Start the fork server, if it is used and not started yet, without waiting for it."""
        if self.config.uses_fork_server and not self._closing and self._zygote is None:
            self._fork_server_task()

    async def _start_fork_server(self) -> ForkServer | None:
        venv_root = self.config.venv_root
        try:
            runtime = await asyncio.to_thread(runtime_dir, venv_root, True,  # file work: not on the loop
                                              self.config.tracing)
            return await ForkServer.start(venv_root, runtime, self.config.start_timeout)
        except (ForkServerError, OSError, RuntimeError) as exc:
            logger.warning("the fork server could not start (%s); share_torch extensions are spawned", exc)
            return None

    async def _fork_server(self, python: Path) -> ForkServer | None:
        """The fork server to fork ``python``'s worker from, or None: spawn it (see ``fork_server``)."""
        if not self.config.uses_fork_server or self._closing:
            return None
        server = await self._fork_server_task()
        if server is None:  # it could not start (one warning said so); once it failed, it forks no more
            return None
        why = await asyncio.to_thread(server.suits, python)
        if why is not None:
            logger.info("extension venv %s is spawned, not forked: %s", python.parent.parent, why)
            return None
        return server

    async def stop_all(self) -> None:
        """Stop every extension concurrently and close the broker; idempotent."""
        self._closing = True
        if self._loop is None:
            return
        handles = list(self._handles.values())  # each stops every worker of its extension
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
        self._extensions.clear()
        self._handles.clear()
        assert self._events is not None
        await self._events.aclose()
        for task in [self._heartbeats, *self._leaving]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._leaving, *([self._heartbeats] if self._heartbeats else []),
                             return_exceptions=True)
        await asyncio.gather(*(ep.aclose() for ep in [self.endpoint, *self._singletons.values()]))
        if self._zygote is not None:  # after the workers it forked: their exits are reported by it
            if not self._zygote.done():
                self._zygote.cancel()
            server = (await asyncio.gather(self._zygote, return_exceptions=True))[0]
            if isinstance(server, ForkServer):
                await server.aclose(self.config.stop_timeout)
        if self._admin is not None:  # before the broker: its socket lives in the broker's directory
            self._admin.close()
        self.broker.close()
        _shm.trim()

    aclose = stop_all

    async def stop_all_extensions(self) -> None:
        """``stop_all()``, by the name pyisolate 0.10 gave it."""
        await self.stop_all()

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
        handle = self._handles.get(name)
        if handle is not None:
            return handle
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

    def _host_endpoints(self) -> list[Endpoint]:
        """The endpoints of the host's actors: the host's own, then each singleton's."""
        return [self.endpoint, *list(self._singletons.values())]

    def _singleton_names(self) -> list[bytes]:
        """Actor names of the shared singletons registered so far."""
        return list(self._singletons)

    def _fail_peer(self, name: bytes, exc: BaseException, *, forget: bool = True) -> None:
        """Extension ``name`` is gone: every actor drops what concerned it.

        Host-side actors directly; workers hear GONE from the broker, with ``exc``. With
        ``forget`` the broker also stops routing to it (not while it is still asked to stop).
        """
        for endpoint in [self.endpoint, *self._singletons.values()]:
            endpoint.fail_peer(name, exc)
        broker = self.broker
        if forget:
            broker.forget(name)
        try:
            body = encode_exception(exc)[0]
        except Exception:  # its own exception cannot travel: say so in words
            body = encode_exception(ExtensionClosedError(f"actor {name.decode()!r} left"))[0]
        broker.announce_gone(name, body)

    def _host_actor(self, name: bytes, root: object, on_control: Any = None) -> Endpoint:
        broker = self.broker

        def send(dest: bytes, frames: list[Any]) -> None:
            broker.send(dest, name, frames)

        endpoint = Endpoint(name, self.loop, send, root=root, origin=HOST, chain_loops=self._chain_loops,
                            on_control=on_control, max_in_flight=self.config.max_in_flight,
                            max_message_size=self.config.max_message_size)
        endpoint.types = self.app_types.registry if self.app_types is not None else None
        if self.traces is not None:
            endpoint.tracing = self.traces.tracing()
        endpoint.values.cuda_refusal = self._cuda_refusal
        endpoint.calls.stats = self._call_stats
        broker.add_local(name, endpoint.on_frames)
        return endpoint

    def _add_singleton(self, api: type[ProxiedSingleton]) -> None:
        name = actor_name(api).encode()
        endpoint = self._singletons.get(name)
        if endpoint is not None:
            if type(endpoint.root) is not api:
                raise ConfigError(f"two singleton classes are named {name.decode()!r}; rename one")
            return
        if name == HOST or name.decode() in self._extensions or self.broker.has_actor(name):
            raise ConfigError(f"the singleton name {name.decode()!r} is taken by an extension (or the host): actor "
                              "names are one namespace; rename the class or the extension")
        self._singletons[name] = self._host_actor(name, api())
        self._singletons[name].calls.why_gone = self._why_gone

    def _cuda_refusal(self, peer: bytes) -> str | None:
        """Why CUDA tensors may not travel between the host's actors and ``peer`` (None: they may)."""
        backend = self._actors.get(peer)
        if backend is not None and not backend.cuda_ipc:
            return (f"extension {backend.name!r} does not share CUDA tensors (share_cuda_ipc is off); load it with "
                    "share_torch=True and share_cuda_ipc=True to share them")
        return None

    def _connecting_workers(self) -> int:
        """Workers spawned that have not said READY yet: each may still open a connection."""
        return sum(1 for b in self._actors.values() if b.state is State.STARTING and b.process is not None)

    def _adopt(self, worker: Worker) -> None:
        """Route READY, heartbeats and events of ``worker``'s actor to it until it is forgotten."""
        self._actors[worker.bname] = worker

    def _serve(self, worker: Worker, previous: Worker) -> None:
        """``worker`` serves its extension from now on in place of ``previous`` (a reload's
        switch): the extension's call counters go on with it, one reload more."""
        self._extensions[worker.name] = worker
        worker.call_stats = previous.call_stats
        worker.call_stats.count_reload(previous.restart_count)
        if self.config.stats:
            self._call_stats[worker.bname] = worker.call_stats

    def _forget(self, backend: Worker | LocalBackend) -> None:
        """``backend`` is released; if it served its extension, the name is free again (not when it
        is a reload's new worker that failed, or an old one retired: the handle serves on)."""
        if isinstance(backend, Worker):
            if self._actors.get(backend.bname) is backend:
                del self._actors[backend.bname]
            self._call_stats.pop(backend.bname, None)  # each generation has an actor name of its own
            _shm.traffic(backend.bname, forget=True)
        if self._extensions.get(backend.name) is backend:
            del self._extensions[backend.name]
            del self._handles[backend.name]
            public = backend.name.encode()
            if public in self.broker.moves:  # a reloaded extension is gone: its name is free again
                self.broker.move(public, public)

    def _remember_reloaded(self, actor: bytes, reason: ExtensionReloadedError) -> None:
        """Calls to ``actor`` (a retired worker) fail with ``reason`` once it is gone."""
        self._reloaded[actor] = reason
        while len(self._reloaded) > _REMEMBERED_RELOADS:
            self._reloaded.popitem(last=False)

    def _why_gone(self, actor: bytes) -> BaseException | None:
        reason = self._reloaded.get(actor)
        if reason is None:
            return None
        return ExtensionReloadedError(str(reason), extension=reason.extension, generation=reason.generation)

    def _emit_own(self, extension: str, name: str, value: object) -> None:
        """Deliver the manager's own event ``name`` about ``extension`` to ``on_event`` handlers."""
        if self._events is not None and not self._closing:
            self._events.put(extension, name, value)

    def _start_heartbeats(self) -> None:
        """Check every ready worker's liveness from now on (once per manager)."""
        if self._heartbeats is None and not self._closing:
            self._heartbeats = self.loop.create_task(self._beat(), name="pyisolate-heartbeats")

    async def _beat(self) -> None:
        """Ping each ready worker; kill one whose ping stays unanswered for heartbeat_timeout.

        A ping is answered by the worker's event loop, so a worker stuck in C code holding the
        GIL, or with a blocked loop, stops answering. Only pings actually sent count: a host
        whose own loop was blocked does not blame its workers. No error of one round ends the
        task: liveness must outlive any single fault.
        """
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self._beat_once(time.monotonic())
            except Exception:  # a bug here must not end liveness checks for every worker
                logger.exception("heartbeat round failed; the next one runs in %.1f s", interval)

    def _beat_once(self, now: float) -> None:
        limit = self.config.heartbeat_timeout
        ping = [pack_header(Kind.HEARTBEAT, 0), b""]
        for backend in list(self._actors.values()):
            if backend.state is not State.READY or backend.process is None:
                continue
            if backend.ping_since is None:
                backend.ping_since = now
            elif now - backend.ping_since > limit:
                backend.hung_for = now - backend.ping_since
                logger.warning("extension %r stopped answering heartbeats for %.1f s: killing it",
                               backend.name, backend.hung_for)
                backend.process.kill()
                continue
            try:
                self.broker.send(backend.bname, HOST, ping, urgent=True)
            except LookupError:
                self._on_leave(backend.bname)

    def _on_leave(self, name: bytes) -> None:
        """The broker found ``name``'s connection gone. A worker that dies closes it on its way
        out, and is reported as the crash it is; one still running after ``_CUT_OFF_GRACE`` was
        cut off (a frame over max_message_size, or it closed its socket) and cannot serve: end it."""
        backend = self._actors.get(name)
        if backend is not None and backend.state is State.READY and backend.process is not None:
            task = self.loop.create_task(self._end_if_cut_off(backend, backend.process))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    async def _end_if_cut_off(self, backend: Worker, process: WorkerProcess | RemoteProcess) -> None:
        try:
            async with asyncio.timeout(_CUT_OFF_GRACE):
                await asyncio.shield(process.wait())
        except TimeoutError:
            if backend.process is process and process.returncode is None:
                backend.lost_connection = True
                logger.warning("extension %r lost its connection to the broker: killing it", backend.name)
                process.kill()

    def _on_control(self, sender: bytes, kind: Kind, call_id: int, extra: list[object], body: bytes,
                    buffers: list[bytes]) -> None:
        if kind is Kind.HEARTBEAT:
            beating = self._actors.get(sender)
            if beating is not None:
                beating.ping_since = None
            return
        if kind is Kind.EVENT:
            if extra and isinstance(extra[0], str) and self._events is not None:
                if extra[0].startswith(_OWN_EVENTS):
                    logger.debug("event %r from %r refused: names starting with %r are the manager's own",
                                   extra[0], sender, _OWN_EVENTS)
                    return
                worker = self._actors.get(sender)  # any generation of an extension emits under its name
                who = worker.name if worker is not None else sender.decode(errors="replace")
                size = len(body) + nbytes(buffers)
                if not self._events.admit(who, size):
                    return  # counted and logged by Events; not even decoded
                try:
                    value = self.endpoint.decode(body, buffers, sender)
                except Exception as exc:  # a bad event must not take the host down
                    logger.warning("undecodable event %r from %r: %s", extra[0], sender, exc)
                    return
                self._events.put(who, extra[0], value, size)
            return
        backend = self._actors.get(sender)
        if kind is Kind.SPANS:  # from one of our workers, and only where we trace
            if backend is not None and self.traces is not None:
                self.traces.receive(backend.name, backend.process.pid if backend.process else None, body)
            return
        if backend is not None and kind in (Kind.READY, Kind.LOAD_FAILED):
            backend.on_control(kind, body, buffers)
