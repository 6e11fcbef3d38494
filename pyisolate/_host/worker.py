"""A remote extension as the manager sees it: its worker process, state, readiness and restarts."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pyisolate.broker.protocol import Kind
from pyisolate.workers.exits import EXIT_CONFINE
from pyisolate.workers.loader import ClassSpec, class_spec

from .._config import ExtensionConfig, ExtensionManagerConfig
from .._curve import CurveConfig
from .._envs import ensure_venv, runtime_dir
from .._rpc import CallStats
from .._singleton import ProxiedSingleton
from .._wire import DecodeError, decode_exception
from .._wire import shm as _shm
from ..errors import (
    ExtensionClosedError,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionReloadedError,
    PyisolateError,
    UnroutableError,
)
from .apptypes import AppTypes
from .drain import CallCount
from .process import WorkerProcess, ensure_fd_headroom, extension_logger
from .placed import Placed
from .remote import LOST, RemoteProcess, remote_boot
from .sandbox import Confinement, Resolved, prepare

if TYPE_CHECKING:
    from pyisolate.broker.router import Broker

    from .._rpc import Endpoint
    from .zygote import ForkServer

__all__ = ["Host", "State", "Worker", "describe_exit", "retrieve"]

logger = logging.getLogger("pyisolate")


class State(enum.Enum):
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


class Host(Protocol):
    """What a Worker needs of the manager that owns it (``ExtensionManager`` is one)."""
    config: ExtensionManagerConfig
    extension_spec: ClassSpec | None
    app_types: AppTypes | None
    _closing: bool

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def endpoint(self) -> Endpoint: ...
    def _singleton_names(self) -> list[bytes]: ...
    def _connecting_workers(self) -> int: ...
    def _start_heartbeats(self) -> None: ...
    def _fail_peer(self, name: bytes, exc: BaseException, *, forget: bool = True) -> None: ...
    def _forget(self, backend: Worker) -> None: ...
    def _adopt(self, backend: Worker) -> None: ...
    async def _fork_server(self, python: Path) -> ForkServer | None: ...
    def _warm_fork_server(self) -> None: ...
    @property
    def listen_endpoint(self) -> str | None: ...


class Worker:
    """A remote extension as the manager sees it: its process, its state, its readiness.

    ``generation``: 0 for the worker a load starts, n for the one the n-th reload attempt
    starts (see ``generations.Generations``). Its actor name on the broker is the extension's
    name for generation 0 and ``<name>@<n>`` after, so that two generations run side by side.
    """

    def __init__(self, manager: Host, config: ExtensionConfig, resolved: Resolved, *, generation: int = 0) -> None:
        self.name = config.name
        self.generation = generation
        self.actor = config.name if generation == 0 else f"{config.name}@{generation}"
        self.bname = self.actor.encode()
        self.config = config
        self.resolved = resolved  # the policy it runs under
        # CUDA tensors travel to and from it (unset: where it shares the host's torch).
        self.cuda_ipc = config.share_torch if config.share_cuda_ipc is None else config.share_cuda_ipc
        self._manager = manager
        self.state = State.STARTING
        self.process: WorkerProcess | RemoteProcess | None = None
        self.confinement: Confinement | None = None  # this run's; a restart makes a new one
        self.placed: Placed | None = None  # ExtensionConfig.placement: its Ray launches
        self.ready: asyncio.Future[None] = manager.loop.create_future()
        self._error: BaseException | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.ping_since: float | None = None  # when the oldest unanswered heartbeat was sent
        self.hung_for: float | None = None
        self.lost_connection = False  # the broker found its connection gone, so it was killed
        self._restarts: list[float] = []  # when each restart in the policy's window happened
        self._restarting: BaseException | None = None  # the crash being recovered from
        self.restart_count = 0
        #: What the host's calls to it did (see ``pyisolate._host.stats``); counted while the
        #: manager counts (``ExtensionManagerConfig.stats``), kept across restarts.
        self.call_stats = CallStats()
        self.loaded_at = time.time()
        # Reload: calls sent (or about to be sent) here, counted so that a retired worker is
        # stopped only once they are done; ``retired`` is why it was, ``successor`` who took over.
        self.calls = CallCount(manager.loop)
        self.retired: ExtensionReloadedError | None = None
        self.successor: Worker | None = None
        self.peer_drain = 0.0  # retired: seconds its STOP lets the calls it serves finish (set by the reload)
        self.start_task = manager.loop.create_task(self._start(), name=f"pyisolate-start-{self.name}")
        self.start_task.add_done_callback(retrieve)

    # -- the Backend protocol ------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.state.value

    async def wait_ready(self) -> None:
        if asyncio.get_running_loop() is not self._manager.loop:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.wait_ready(), self._manager.loop)
            )
        while self.state is State.STARTING:  # a restart that fails in turn starts another
            await asyncio.shield(self.ready)
        if self.state is not State.READY:
            raise self._unavailable()

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        if not self.calls.enter():  # retired as this call came (from another thread): its successor serves it
            assert self.successor is not None
            return await self.successor.call(method, args, kwargs, timeout)
        try:
            return await self._call(method, args, kwargs, timeout)
        finally:
            self.calls.leave()

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    timeout: float | None) -> Any:
        retried = False
        while True:
            if self.state is not State.READY:
                policy = self.config.restart
                if self._restarting is not None and policy is not None and policy.calls_during_restart == "fail":
                    raise self._restarting
                await self.wait_ready()
            try:
                return await self._manager.endpoint.remote_call(self.bname, method, args, kwargs, 0, timeout)
            except UnroutableError:
                # Ours only if the broker lost the worker (one the extension raised is its answer).
                if retried or self.state is not State.READY or self._manager.broker.has_actor(self.bname):
                    raise
            # Ready, yet the broker has no such actor: the worker died (or was cut off) and its exit
            # is not processed yet. Nothing was sent, so once the exit is known the call goes by the
            # restart policy like any call made during a restart (waits, or fails with the crash).
            retried = True
            await self._wait_down()

    def retire(self, reason: ExtensionReloadedError, successor: Worker) -> None:
        """Take no new calls (they go to ``successor``) and never restart; on the manager's loop,
        once the successor serves. What it owned ends with ``reason``."""
        self.successor = successor
        self.retired = reason
        self.calls.retire()  # last: a call refused by the count goes to the successor

    async def _wait_down(self) -> None:
        """Return once the exit of the current worker process has been processed."""
        if asyncio.get_running_loop() is not self._manager.loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._wait_down(), self._manager.loop))
        if self._watch is not None:
            await asyncio.wait([self._watch])

    async def stop(self) -> None:
        if asyncio.get_running_loop() is not self._manager.loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.stop(), self._manager.loop))
        if self._stop_task is None:
            self._stop_task = self._manager.loop.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    # -- life ----------------------------------------------------------------------------

    def _unavailable(self) -> BaseException:
        if self.state in (State.STOPPING, State.STOPPED):
            return ExtensionClosedError(f"extension {self.name!r} is stopped")
        assert self._error is not None
        return self._error

    async def _start(self) -> None:
        manager, config = self._manager, self.config
        if config.remote:
            return await self._join_remote()
        if config.share_torch:
            manager._warm_fork_server()  # its torch import overlaps this venv's checks
        try:
            python = await ensure_venv(
                venv_root=manager.config.venv_root,
                name=self.name,
                dependencies=config.dependencies,
                share_torch=config.share_torch,
                allow_direct_references=config.allow_direct_references,
                sources=config.sources,
                progress=manager.config.on_progress,
            )
            # Stats at least, a metadata scan and symlinks to write at most: never on the loop.
            runtime = await asyncio.to_thread(runtime_dir, manager.config.venv_root, config.share_torch,
                                              manager.config.tracing)
            ensure_fd_headroom(self.name, manager._connecting_workers())
            if self.confinement is not None:  # a restart: the last run's groups and temp dir go
                self.confinement.close()
            specs = [manager.extension_spec, *(class_spec(api) for api in config.apis)]
            # The manager's first, then the extension's own, then where the app's types module is
            # imported from: the order they go on its sys.path.
            app_types = manager.app_types
            host_paths = list(dict.fromkeys(Path(p) for p in [*manager.config.host_paths, *config.host_paths,
                                                              *([app_types.root] if app_types else [])]))
            self.confinement = confinement = await asyncio.to_thread(
                prepare, self.name, self.resolved, venv=python.parent.parent, runtime=runtime,
                module_path=Path(config.module_path), class_files=[spec["file"] for spec in specs if spec],
                broker_endpoint=manager.broker.endpoint, share_torch=config.share_torch, host_paths=host_paths,
            )  # fmt: skip
            # A share_torch worker is forked from the fork server where it can be (not under bwrap:
            # that must exec); confined at boot by its own rules and limits like a spawned one.
            fork_server = (await manager._fork_server(python)
                           if config.share_torch and confinement.argv is None else None)
            secret = secrets.token_bytes(32)
            manager.broker.expect(self.bname, secret)
            started = time.monotonic()
            self.process = await WorkerProcess.spawn(
                name=self.actor,
                log=extension_logger(self.name),
                python=python,
                runtime=runtime,
                before_boot=confinement.attach,
                sandbox=confinement.argv,
                fork_server=fork_server,
                boot={
                    **confinement.boot(),
                    "name": self.actor,
                    "endpoint": manager.broker.endpoint,
                    "secret": secret.hex(),
                    "module_path": str(config.module_path),
                    "host_paths": [str(path) for path in host_paths],
                    "cuda_ipc": self.cuda_ipc,
                    "share_torch": config.share_torch,
                    "extension_class": manager.extension_spec,
                    "apis": [class_spec(api) for api in config.apis],
                    "types": app_types.reference if app_types else None,
                    "session": _shm.session(),
                    "shm_pool_bytes": _shm.pool.limit,
                    "host_actors": ["host", *(n.decode() for n in manager._singleton_names())],
                    "handshake_timeout": manager.config.start_timeout,
                    # The worker drops records below what the host would log for this extension.
                    "log_level": extension_logger(self.name).getEffectiveLevel(),
                    "tracing": manager.config.tracing,
                    "limits": {
                        "max_in_flight": manager.config.max_in_flight,
                        "max_message_size": manager.config.max_message_size,
                        "max_queued_bytes": manager.config.max_queued_bytes,
                    },
                },
                pass_env=tuple(config.pass_env),
                env={**config.env, **confinement.env()},
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
            await self._start_failed(exc)
            raise

    async def _join_remote(self) -> None:
        """``_start`` for ``remote=True``: announce the name, then wait for its worker to join and be ready."""
        manager = self._manager
        timeout = manager.config.start_timeout
        try:
            self.process = process = RemoteProcess(self.actor, manager.loop)
            manager.broker.expect(self.bname, b"", remote=True, welcome=remote_boot(
                manager.config, self.config, extension_spec=manager.extension_spec, app_types=manager.app_types,
                singletons=manager._singleton_names()))
            _shm.apart.add(self.bname)  # nothing of ours is shared with it: values go as frames
            if self.config.placement is not None:  # we start it: on a Ray node, unless a launch runs
                if self.placed is None:
                    self.placed = Placed(self.name, self.config.placement, self._placed_ended)
                await self.placed.ensure(manager.config, self.config, manager.broker.listener,
                                         manager.listen_endpoint)
                process.output = self.placed.stderr_tail
            self._watch = manager.loop.create_task(self._watch_exit(process))
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self.ready)
            except TimeoutError:
                raise ExtensionLoadError(
                    f"extension {self.name!r} (remote=True) did not join and become ready within {timeout:.0f} s "
                    f"(ExtensionManagerConfig.start_timeout); run its worker on the other machine: pyisolate worker "
                    f"--connect tcp://THIS_HOST:{_port(manager.broker)} --server-key {_server_key(manager)} --key "
                    f"{self.name}.key_secret --name {self.name} EXTENSION_DIR", extension=self.name) from None
        except BaseException as exc:
            await self._start_failed(exc)
            raise

    async def _start_failed(self, exc: BaseException) -> None:
        """A start raised (or was cancelled): mark it failed, if nothing else did, and release it."""
        if self.state is State.STARTING:
            self._fail(State.FAILED, exc if isinstance(exc, Exception) else ExtensionClosedError(
                f"loading extension {self.name!r} was cancelled"))
        await self._release(self._error or ExtensionClosedError(f"extension {self.name!r} was stopped"))

    def _placed_ended(self, how: str) -> None:
        """The Ray launch of its worker ended: the worker is gone with it (a crash, unless stopping)."""
        if isinstance(self.process, RemoteProcess):
            self.process.end(LOST, how)

    def on_control(self, kind: Kind, body: bytes, buffers: list[bytes]) -> None:
        """READY or LOAD_FAILED from the worker."""
        if self.state is not State.STARTING:
            return
        if kind is Kind.READY:
            self.state = State.READY
            self._restarting = None
            self._manager._start_heartbeats()
            if not self.ready.done():
                self.ready.set_result(None)
            return
        try:
            remote = decode_exception(body, buffers)
            text = f"{type(remote).__name__}: {remote}{_host_module_hint(remote)}"
            tb = getattr(remote, "remote_traceback", "")
        except DecodeError as exc:
            text, tb = f"undecodable failure report: {exc}", ""
        self._fail(State.FAILED, ExtensionLoadError(
            f"extension {self.name!r} failed to load: {text}", extension=self.name, remote_traceback=tb))

    def _fail(self, state: State, exc: BaseException) -> None:
        self.state = state
        self._error = exc
        if not self.ready.done():
            self.ready.set_result(None)  # waiters look at state and _error
        self._manager._fail_peer(self.bname, exc)

    async def _watch_exit(self, process: WorkerProcess | RemoteProcess) -> None:
        code = await process.wait()
        if self.state is State.STOPPING and code == 0:
            # A worker exits 0 only once it has answered STOP; seen exiting first, that answer
            # is still on its way (through the broker), and _stop waits for it.
            return
        if self.state is State.STOPPING:  # gone in its stop hook (SystemExit, a crash): no answer will come
            self._manager._fail_peer(self.bname, ExtensionClosedError(
                f"extension {self.name!r} {describe_exit(code)} while stopping"))
            return
        if self.state in (State.STOPPED, State.FAILED):
            return
        how = process.describe(code) if isinstance(process, RemoteProcess) else describe_exit(code)
        reason = self.confinement.exit_reason() if self.confinement is not None else None
        if reason is not None:
            how = f"was stopped: {reason} ({how}); raise ExtensionConfig(limits=...) or use less"
        elif code == EXIT_CONFINE:
            how = "could not be confined as its sandbox_mode='required' asks (see its stderr below)"
        elif self.hung_for is not None and isinstance(process, RemoteProcess):
            how = (f"(remote) stopped answering heartbeats for {self.hung_for:.1f} s: a network partition, or its "
                   "machine or process is gone")
        elif self.hung_for is not None:
            how = f"stopped answering heartbeats for {self.hung_for:.1f} s and was killed ({how})"
        elif self.lost_connection and isinstance(process, RemoteProcess):
            how = "(remote) lost its connection to the broker: a network partition, or its process is gone"
        elif self.lost_connection:
            how = (f"lost its connection to the broker and was killed ({how}); a worker is cut off when it "
                   "sends a frame larger than max_message_size or closes its socket")
        tail = process.stderr_tail()
        if self.state is State.STARTING and self._restarting is None:  # its first load: that failed
            self._fail(State.FAILED, ExtensionLoadError(
                f"extension {self.name!r} {how} before it was ready", extension=self.name, remote_traceback=tail))
        else:  # it crashed, or a restart did: the policy decides again
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
                self._fail(State.CRASHED, crash)
            else:
                self._begin_restart(crash, delay)
        # The segments it shared, held until now: an answer it sent just before it died could
        # still be decoded; its calls have ended now, and its callers resume only after this.
        _shm.sweep(self.actor)
        await process.aclose()

    def _restart_delay(self) -> float | None:
        """Seconds to wait before restarting, or None if the policy says no (more) restarts."""
        policy = self.config.restart
        if policy is None or self._manager._closing or self.retired is not None:  # a retired one has a successor
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
        self._manager._fail_peer(self.bname, crash)
        self._restarting = crash
        self.restart_count += 1
        self.state = State.STARTING
        if not self.ready.done():  # a restart that died before it was ready: its waiters move on
            self.ready.set_result(None)
        self.ready = self._manager.loop.create_future()
        self.ping_since = self.hung_for = None
        self.lost_connection = False
        logger.warning("restarting extension %r in %.2f s (restart %d of %d within %.0f s)", self.name, delay,
                       len(self._restarts), self.config.restart.max_restarts if self.config.restart else 0,
                       self.config.restart.within if self.config.restart else 0)
        self.start_task = self._manager.loop.create_task(self._restart_after(delay),
                                                         name=f"pyisolate-restart-{self.name}")
        self.start_task.add_done_callback(retrieve)

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)  # the policy's backoff
        await self._start()

    async def _stop(self) -> None:
        if not self.start_task.done():
            self.start_task.cancel()
            await asyncio.gather(self.start_task, return_exceptions=True)
        was_ready = self.state is State.READY
        self.state = State.STOPPING
        closed = self.retired or ExtensionClosedError(f"extension {self.name!r} was stopped")
        drain = self.peer_drain if self.retired is not None else 0.0
        if not drain:
            self._manager._fail_peer(self.bname, closed, forget=False)  # it still takes STOP
        if was_ready and self.process is not None and self.process.returncode is None:
            try:
                async with asyncio.timeout(self._manager.config.stop_timeout + drain):
                    await self._answer_or_exit(self._manager.endpoint.request_stop(self.bname, drain), self.process)
            except TimeoutError:
                logger.warning("extension %r did not finish stop() within %.1f s", self.name,
                               self._manager.config.stop_timeout)
            except PyisolateError as exc:
                logger.warning("extension %r: stop failed: %s", self.name, exc)
            except Exception as exc:  # the extension's own stop() raised; it still goes away
                logger.warning("extension %r: stop() raised %r", self.name, exc)
        if drain:  # a reload's old worker: the calls other extensions made on it were answered first
            self._manager._fail_peer(self.bname, closed, forget=False)
        if self.process is not None:
            await self.process.stop(self._manager.config.stop_timeout)
        await self._release(closed)
        self.state = State.STOPPED

    @staticmethod
    async def _answer_or_exit(request: Awaitable[object], process: WorkerProcess | RemoteProcess) -> None:
        """Wait for the answer to STOP, or for the worker's exit, whichever comes first.

        A worker exits once it has answered STOP, and its answer can be lost on the way: when
        many stop at once, the broker's GONE notice about one finds another's socket closed,
        and the broker forgets that connection before reading the answer queued behind it.
        Its exit says as much as the answer: the stop is done, with no wait for the timeout.
        """
        answer = asyncio.ensure_future(request)
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({answer, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (answer, exited):
                if not waiter.done():
                    waiter.cancel()
            await asyncio.gather(answer, exited, return_exceptions=True)
        if answer.done() and not answer.cancelled() and (error := answer.exception()) is not None:
            raise error

    async def _release(self, why: BaseException) -> None:
        # Calls that slipped in while it stopped (they waited for a slot) end here too.
        self._manager._fail_peer(self.bname, why)
        _shm.apart.discard(self.bname)
        self._manager._forget(self)
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
        if self.process is not None:
            await self.process.aclose()
            _shm.sweep(self.actor)  # descriptors held for it (its memory goes with its mappings)
        if self.confinement is not None:  # after its process: a cgroup with processes in it stays
            self.confinement.close()
        if self.placed is not None:  # its Ray launch, and the key made for it
            await self.placed.close(self._manager.config.stop_timeout)
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)


def _host_module_hint(remote: BaseException) -> str:
    """When an extension failed to import a module the host has loaded, say why and what to do:
    an extension sees only its own venv; a host module with ProxiedSingletons comes with apis=."""
    match = re.fullmatch(r"No module named '([\w.]+)'", str(remote)) if isinstance(remote, ImportError) else None
    if match is None:
        return ""
    name = match[1].split(".")[0]
    module = sys.modules.get(name)
    if module is None:
        return ""

    singletons = sorted(
        value.__qualname__ for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, ProxiedSingleton) and value is not ProxiedSingleton
    )
    if singletons:
        return (f" ({name!r} is a module of the host that defines the singleton(s) {', '.join(singletons)}: list "
                f"them in ExtensionConfig(apis=[{', '.join(singletons)}]) and the extension can import it)")
    root = _import_root(module)
    if root is not None:
        return (f" ({name!r} is a module of the host, from {root}; an extension sees only its own venv and the "
                f"host folders it is given: pass ExtensionConfig(host_paths=[{root!r}]) (or "
                "ExtensionManagerConfig(host_paths=...)) to let it import the host's copy, or add it to the "
                "extension's dependencies)")
    return (f" ({name!r} is a module of the host; an extension sees only its own venv: add it to the "
            "extension's dependencies, or, if it defines a ProxiedSingleton, list that class in "
            "ExtensionConfig(apis=[...]))")


def _import_root(module: object) -> str | None:
    """The folder on the host's sys.path that a top-level module was imported from, unless it is
    a site-packages folder (which host_paths refuses)."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return None
    folder = os.path.dirname(os.path.abspath(file))
    if os.path.basename(file).startswith("__init__."):
        folder = os.path.dirname(folder)
    if os.path.basename(folder) in ("site-packages", "dist-packages") or folder.startswith(sys.base_prefix):
        return None
    return folder


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's exception as seen: it reaches callers through the handle."""
    if not task.cancelled():
        task.exception()


def _port(broker: Broker) -> str:
    listener = broker.listener
    return listener.endpoint.rpartition(":")[2] if listener is not None else "PORT"


def _server_key(manager: Host) -> str:
    curve = manager.config.curve
    return curve.server.public if isinstance(curve, CurveConfig) else "HOST_PUBLIC_KEY"
