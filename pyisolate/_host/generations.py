"""Generations: an isolated extension's handle backend, which a reload moves to a new worker.

Blue-green: ``reload()`` starts a new worker (a new generation) beside the one serving; once it
is READY, new calls go to it (one attribute, switched on the manager's loop); the calls the old
worker has open finish there, for at most ``reload_drain_timeout``; then the old worker stops.

Each generation is an actor of its own on the broker: generation 0 under the extension's name,
generation n under ``<name>@<n>`` (``@`` is not allowed in extension names, so no other actor
can hold it). Everything the RPC layer keeps per peer (calls waiting for answers, references
given out, shared memory pinned, streams) is keyed by actor name, so the two workers never mix
while both run, and what the old one gave out ends with ``ExtensionReloadedError`` when it goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .._config import ExtensionConfig
from .._upstream import config_from
from ..errors import ConfigError, ExtensionClosedError, ExtensionReloadedError
from .sandbox import Resolved, resolve
from .watch import watch_source
from .worker import Host, Worker, retrieve

__all__ = ["RELOAD_FAILED", "RELOAD_FINISHED", "RELOAD_STARTED", "RELOAD_SWITCHED", "RELOAD_WATCHING", "Generations",
           "drop_bytecode"]

logger = logging.getLogger("pyisolate")

#: Events the manager delivers to ``on_event`` handlers, as if the extension had emitted them.
#: Their value is a dict: ``generation`` (int) and, by event, ``pid``, ``drained`` or ``error``.
RELOAD_STARTED = "pyisolate.reload.started"
RELOAD_SWITCHED = "pyisolate.reload.switched"  # the new worker serves new calls; the old one drains
RELOAD_WATCHING = "pyisolate.reload.watching"  # watch=True: changes from now on are seen (value: path)
RELOAD_FINISHED = "pyisolate.reload.finished"
RELOAD_FAILED = "pyisolate.reload.failed"


class ReloadHost(Host, Protocol):
    """What Generations needs of the manager besides what a Worker does (``ExtensionManager`` is one)."""

    def _serve(self, worker: Worker, previous: Worker) -> None: ...
    def _remember_reloaded(self, actor: bytes, reason: ExtensionReloadedError) -> None: ...
    def _emit_own(self, extension: str, name: str, value: object) -> None: ...


class Generations:
    """The workers of one isolated extension: the one serving (``current``) and, during a
    reload, the one starting and the one draining. Implements the handle's Backend protocol."""

    def __init__(self, manager: ReloadHost, config: ExtensionConfig, resolved: Resolved,
                 *, watch: bool) -> None:
        self.name = config.name
        self._manager = manager
        self.current = self._spawn(config, resolved, 0)
        self._attempts = 0  # the generation number of the latest reload attempt
        self._live: set[Worker] = {self.current}  # every worker of ours not yet stopped
        self._lock = asyncio.Lock()  # one reload at a time
        self._reloads: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._watcher: asyncio.Task[None] | None = None
        if watch:
            self._watcher = manager.loop.create_task(self._watch(Path(config.module_path)),
                                                     name=f"pyisolate-watch-{self.name}")
            self._watcher.add_done_callback(self._watch_ended)

    # -- the Backend protocol ------------------------------------------------------------

    @property
    def config(self) -> ExtensionConfig:
        return self.current.config

    @property
    def status(self) -> str:
        return self.current.status

    async def wait_ready(self) -> None:
        await self.current.wait_ready()

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        # The serving worker's coroutine itself (no frame of ours on each call): it counts the
        # call (Worker.calls), or hands it to its successor if it was retired as the call came.
        return self.current.call(method, args, kwargs, timeout)

    async def stop(self) -> None:
        loop = self._manager.loop
        if asyncio.get_running_loop() is not loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.stop(), loop))
        self._stopped = True
        tasks = [task for task in [self._watcher, *self._reloads] if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Every worker a reload left behind too: one starting, one draining (a reload leaves a
        # worker out of _live only once it has stopped it).
        await asyncio.gather(*(worker.stop() for worker in list(self._live)), return_exceptions=True)
        self._live.clear()

    # -- reload --------------------------------------------------------------------------

    async def reload(self, config: ExtensionConfig | Mapping[str, Any] | None = None) -> None:
        """Start a new worker beside the old, switch calls to it once ready, drain and stop the old.

        Raises:
            ExtensionLoadError: the new worker failed to load (the old one serves on).
            EnvironmentBuildError: its changed dependencies could not be installed.
            ConfigError: ``config`` is invalid or names another extension.
            ExtensionClosedError: the extension is stopped.
        """
        loop = self._manager.loop
        if asyncio.get_running_loop() is not loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.reload(config), loop))
        new_config = None if config is None else config_from(ExtensionConfig, config, "reload()")
        if new_config is not None and new_config.name != self.name:
            raise ConfigError(f"reload(config=...) of extension {self.name!r} got a config named "
                              f"{new_config.name!r}; an extension keeps its name")
        if new_config is not None and not new_config.isolated:
            raise ConfigError(f"reload(config=...) of extension {self.name!r}: isolated=False cannot be reloaded")
        if self._stopped:
            raise ExtensionClosedError(f"extension {self.name!r} is stopped")
        if self.current.config.remote or (new_config is not None and new_config.remote):
            raise ConfigError(f"reload() of extension {self.name!r}: a remote worker cannot be reloaded from the host "
                              "(its code and venv are on its own machine); restart `pyisolate worker` there, or stop "
                              "and load the extension again")
        task = loop.create_task(self._reload(new_config), name=f"pyisolate-reload-{self.name}")
        task.add_done_callback(retrieve)
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        await asyncio.shield(task)  # a caller that stops waiting does not leave half a reload

    async def _reload(self, config: ExtensionConfig | None) -> None:
        manager = self._manager
        async with self._lock:
            old = self.current
            await old.wait_ready()  # a reload replaces a serving worker; a failed load raises here
            if self._stopped:
                raise ExtensionClosedError(f"extension {self.name!r} is stopped")
            self._attempts += 1
            generation = self._attempts
            resolved = old.resolved if config is None else resolve(config, manager.config)
            config = config or old.config
            manager._emit_own(self.name, RELOAD_STARTED, {"generation": generation})
            await asyncio.to_thread(drop_bytecode, Path(config.module_path))
            new = self._spawn(config, resolved, generation)
            self._live.add(new)
            try:
                await new.wait_ready()  # its venv first: rebuilt only if its dependencies changed
            except BaseException as exc:
                await new.stop()
                self._live.discard(new)
                if not isinstance(exc, asyncio.CancelledError):  # cancelled: the extension is stopping
                    manager._emit_own(self.name, RELOAD_FAILED, {"generation": generation, "error": str(exc)})
                raise
            reason = ExtensionReloadedError(
                f"extension {self.name!r} was reloaded: the worker of generation {old.generation} that owned this "
                f"was replaced by generation {generation}; call the extension again through its handle",
                extension=self.name, generation=generation)
            self.current = new  # from here new calls go to the new worker
            manager._serve(new, old)
            old.retire(reason, new)
            # Other extensions calling it by name: each is told to call the new worker, and says so.
            moved = manager.broker.move(self.name.encode(), new.bname)
            manager._remember_reloaded(old.bname, reason)
            pid = new.process.pid if new.process is not None else None
            manager._emit_own(self.name, RELOAD_SWITCHED, {"generation": generation, "pid": pid})
            limit = manager.config.reload_drain_timeout
            deadline = manager.loop.time() + limit
            drained = await old.calls.drain(limit)
            if drained:
                try:
                    async with asyncio.timeout(max(deadline - manager.loop.time(), 0.0)):
                        await asyncio.shield(moved)
                except TimeoutError:
                    drained = False
            if drained:  # what other extensions sent it before they were told finishes there, in what is left
                old.peer_drain = max(deadline - manager.loop.time(), 1e-3)
            else:
                logger.warning("extension %r: %d call(s) still running on the old worker after %.1f s "
                               "(reload_drain_timeout) end with ExtensionReloadedError", self.name,
                               old.calls.open, limit)
            await old.stop()
            self._live.discard(old)
            logger.info("extension %r reloaded (generation %d, pid %s)", self.name, generation, pid)
            manager._emit_own(self.name, RELOAD_FINISHED, {"generation": generation, "pid": pid,
                                                           "drained": drained})

    def _spawn(self, config: ExtensionConfig, resolved: Resolved, generation: int) -> Worker:
        worker = Worker(self._manager, config, resolved, generation=generation)
        self._manager._adopt(worker)
        return worker

    # -- watch ---------------------------------------------------------------------------

    async def _watch(self, module_path: Path) -> None:
        try:
            await self.current.wait_ready()
        except Exception:  # a load that failed: its handle is released, nothing to reload
            return
        await watch_source(self.name, module_path, self._on_source_change,
                           lambda: self._manager._emit_own(self.name, RELOAD_WATCHING, {"path": str(module_path)}))

    async def _on_source_change(self) -> None:
        try:
            await self.reload()
        except ExtensionClosedError:
            return  # stopped (its stop() ends this watch too)
        except Exception as exc:  # the watcher is the only one to tell: it logs and watches on
            logger.warning("extension %r: reload after a source change failed; the old worker serves on: %s",
                           self.name, exc)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("extension %r: watching its source stopped: %r", self.name, exc)


def drop_bytecode(module_path: Path) -> int:
    """Remove the compiled files (``__pycache__/*.pyc``) of the extension's own source; return how many.

    Python trusts a ``.pyc`` whose recorded source size and mtime (whole seconds) match, so an
    edit within the same second that keeps the file's size would otherwise load the old code.
    Only the extension's folder is touched, never its venv; files it cannot remove stay.
    """
    root = module_path if module_path.is_dir() else module_path.parent
    removed = 0
    for folder, dirs, files in os.walk(root):  # does not follow links to folders
        if os.path.basename(folder) != "__pycache__":
            continue
        dirs.clear()
        for file in files:
            if file.endswith(".pyc"):
                try:
                    os.unlink(os.path.join(folder, file))
                    removed += 1
                except OSError:
                    pass
    return removed
