"""The host's side of the fork server (zygote) that forks share_torch workers.

A share_torch worker spends most of its start importing torch (seconds of CPU), and each holds
its own copy of what that import built (~150 MB). The fork server (``pyisolate.workers.zygote``)
imports torch and the worker runtime once; a worker forked from it starts with both and shares
their pages with it and with its siblings until it writes them.

One per ``ExtensionManager``, which owns it: started on the first share_torch load (or by
``ExtensionManager.prestart()``), closed by ``stop_all()``. It runs the share_torch runtime
directory (the workers' own) with the host's base interpreter, from a venv of its own under
``venv_root/.runtime`` that holds no package. Which workers it forks is decided per extension
(``suits``): the extension's venv runs the same interpreter, and none of the packages the fork
server imported (torch's family, zmq, msgpack) is a different copy in the venv (a spawned worker
would import the venv's copy; a forked one has the runtime's already). Everything it sends is
checked as untrusted input; a fault, or its exit, closes it, and workers are spawned from then on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from .._wire import shm as _shm
from .forked import STATUS_UNKNOWN, ForkedProcess
from .process import WorkerProcess, bootstrap, worker_env

__all__ = ["ForkServer", "ForkServerError"]

logger = logging.getLogger("pyisolate")

_MAX_MESSAGE = 1 << 20
_ANCILLARY = socket.CMSG_SPACE(array.array("i").itemsize)
_VENV = "fork-server-venv"
_DIST_INFO = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)\.dist-info$")


class ForkServerError(Exception):
    """The fork server could not start, or broke; share_torch workers are spawned instead."""


class ForkServer:
    """One running fork server: its process, its control socket, the workers it forked.

    Use ``start``, then ``fork`` per worker; ``aclose()`` (idempotent) ends it. Forked workers
    outlive it: they are owned by their ``WorkerProcess``.
    """

    def __init__(self, process: WorkerProcess, control: socket.socket, python: Path) -> None:
        self.process = process
        self.python = python
        self.preloaded: frozenset[str] = frozenset()
        self._control: socket.socket | None = control
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._replies: dict[int, asyncio.Future[tuple[int, int, asyncio.Future[int]]]] = {}  # pid, pidfd, status
        self._abandoned: set[int] = set()  # requests whose caller left: what they forked is killed
        self._children: dict[int, tuple[asyncio.Future[int], int]] = {}  # pid -> (status, pidfd dup)
        self._failure: str | None = None
        #: Set once it forks no more (failed or closed).
        self.stopped = asyncio.Event()
        self._loop.add_reader(control.fileno(), self._on_readable)
        self._watch = self._loop.create_task(self._watch_exit(), name="pyisolate-fork-server-exit")

    @classmethod
    async def start(cls, venv_root: Path, runtime: Path, timeout: float) -> ForkServer:
        """Start the fork server on ``runtime`` and wait until it has imported torch.

        Raises:
            ForkServerError: it could not start, or said something else than READY.
        """
        python = await asyncio.to_thread(_own_venv, venv_root)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(python), "-I", "-c", bootstrap("pyisolate.workers.zygote"), str(runtime), str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=worker_env(python), pass_fds=(theirs.fileno(),), start_new_session=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        server = cls(WorkerProcess("fork server", proc, log=logging.getLogger("pyisolate.fork_server")), ours, python)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(server._ready)
        except BaseException as exc:
            await server.aclose()
            if isinstance(exc, TimeoutError):
                raise ForkServerError(f"the fork server did not import torch within {timeout:.0f} s") from None
            if isinstance(exc, ForkServerError):
                tail = server.process.stderr_tail()
                raise ForkServerError(f"{exc}{': ' + tail if tail else ''}") from None
            raise
        logger.debug("fork server ready (pid %d), %d packages preloaded", proc.pid, len(server.preloaded))
        return server

    @property
    def alive(self) -> bool:
        """Whether it still forks (not failed, not closed)."""
        return self._control is not None

    def suits(self, python: Path) -> str | None:
        """Why the venv of ``python`` cannot be forked into (None: it can). Reads the venv; not on the loop."""
        if os.path.realpath(python) != os.path.realpath(self.python):
            return f"its venv's interpreter {os.path.realpath(python)} is not the fork server's"
        clashes = _clashes(python.parent.parent, self.preloaded)
        if clashes:
            return (f"its venv has its own copy of {', '.join(clashes)}, which the fork server imported from the host "
                    "(a spawned worker imports the venv's)")
        return None

    async def fork(self, name: str, python: Path, env: dict[str, str], channel: int) -> ForkedProcess | None:
        """Fork a worker for ``python``'s venv with ``env`` and the control channel ``channel``; None if
        the fork server is gone (the caller spawns the worker)."""
        if self._control is None:  # closed, or failed: the caller spawns
            return None
        request = next(self._ids)
        message = json.dumps({"op": "fork", "id": request, "python": str(python), "venv": str(python.parent.parent),
                              "env": env}).encode()  # fmt: skip
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr; (read, write), close-on-exec
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], channel]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        reply: asyncio.Future[tuple[int, int, asyncio.Future[int]]] = self._loop.create_future()
        self._replies[request] = reply
        try:
            try:
                self._control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
            finally:
                for fd in theirs[:3]:
                    os.close(fd)
            pid, pidfd, status = await asyncio.shield(reply)
        except asyncio.CancelledError:
            if reply.done() and not reply.cancelled() and reply.exception() is None:
                signal_pidfd(reply.result()[1])  # forked already: nothing will own it
                os.close(reply.result()[1])
            else:
                self._abandoned.add(request)
            _close(ours)
            raise
        except (OSError, ForkServerError) as exc:
            _close(ours)
            self._fail(f"a fork request failed: {exc}")
            return None
        finally:
            self._replies.pop(request, None)
        readers: list[asyncio.StreamReader] = []
        transports: list[asyncio.BaseTransport] = []
        try:
            for fd in ours[1:]:
                reader = asyncio.StreamReader(limit=1 << 20, loop=self._loop)
                protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
                pipe, _ = await self._loop.connect_read_pipe(functools.partial(_same, protocol), os.fdopen(fd, "rb", 0))
                readers.append(reader)
                transports.append(pipe)
        except BaseException:
            _close([ours[0], *ours[1 + len(transports):]])
            for opened in transports:
                opened.close()
            signal_pidfd(pidfd)
            os.close(pidfd)
            raise
        logger.debug("fork server forked worker %r (pid %d)", name, pid)
        return ForkedProcess(pid, pidfd, ours[0], readers[0], readers[1], transports, status)

    # -- messages from the fork server ----------------------------------------------------

    def _on_readable(self) -> None:
        while self._control is not None:
            try:
                data, ancillary, flags, _ = self._control.recvmsg(_MAX_MESSAGE, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"its control socket failed: {exc}")
                return
            fds = _shm.descriptors(ancillary)
            if not data and not fds:
                self._fail("it closed its control socket")
                return
            try:
                self._on_message(data, fds, flags)
            except ForkServerError as exc:
                _close(fds)
                self._fail(str(exc))
                return

    def _on_message(self, data: bytes, fds: list[int], flags: int) -> None:
        """Act on one message; ForkServerError (the caller closes ``fds``) if it is not one we expect."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ForkServerError("it sent a message that was cut")
        try:
            message = json.loads(data)
        except ValueError:
            raise ForkServerError("it sent something other than JSON") from None
        op = message.get("op") if isinstance(message, dict) else None
        expected = 1 if op == "forked" else 0
        if len(fds) != expected:
            raise ForkServerError(f"it sent {len(fds)} descriptors with {op!r}")
        if op == "ready" and not self._ready.done():
            modules = message.get("modules")
            if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
                raise ForkServerError("its READY lists no modules")
            self.preloaded = frozenset(modules)
            self._ready.set_result(None)
        elif op == "forked" and _ints(message, "id", "pid"):
            self._on_forked(message["id"], message["pid"], fds[0])
        elif op == "refused" and _ints(message, "id") and isinstance(message.get("error"), str):
            raise ForkServerError(f"it refused a fork request: {message['error']}")
        elif op == "exited" and _ints(message, "pid", "code"):
            child = self._children.pop(message["pid"], None)
            if child is None:
                raise ForkServerError(f"it reported the exit of {message['pid']}, which it did not fork")
            if not child[0].done():
                child[0].set_result(message["code"])
            os.close(child[1])
        else:
            raise ForkServerError(f"it sent an unexpected message {str(message)[:200]!r}")

    def _on_forked(self, request: int, pid: int, pidfd: int) -> None:
        """A worker was forked: hand it (its pid and pidfd) to the fork() that asked for it."""
        if pid <= 0 or pid in self._children:
            raise ForkServerError(f"it reported a fork with pid {pid}")
        reply = self._replies.get(request)
        if reply is None or reply.done():
            if request not in self._abandoned:
                raise ForkServerError(f"it answered request {request}, which was not asked")
            self._abandoned.discard(request)  # the worker's start was cancelled: nothing will own it
            signal_pidfd(pidfd)
            self._children[pid] = (self._loop.create_future(), pidfd)  # its exit is still reported
            return
        status: asyncio.Future[int] = self._loop.create_future()
        self._children[pid] = (status, os.dup(pidfd))
        reply.set_result((pid, pidfd, status))

    # -- end ------------------------------------------------------------------------------

    async def _watch_exit(self) -> None:
        code = await self.process.wait()
        self._fail(f"it exited ({code})")

    def _fail(self, why: str) -> None:
        """Stop using the fork server: fail what waits on it, orphan its workers, close the socket."""
        if self._failure is None:
            self._failure = why
            if self._ready.done():  # after start: one warning (before, start raises)
                logger.warning("the fork server stopped (%s); share_torch extensions are spawned from now on", why)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(ForkServerError(why))
        if not self._ready.done():
            self._ready.set_exception(ForkServerError(why))
            self._ready.exception()  # start() reads it; never "never retrieved"
        for status, pidfd in self._children.values():
            self._orphan(status, pidfd)
        self._children.clear()
        if self._control is not None:
            self._loop.remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        self.stopped.set()

    def _orphan(self, status: asyncio.Future[int], pidfd: int) -> None:
        """Its parent is gone, so nobody reports the status of this worker: once ``pidfd`` says it
        has exited, it is ``STATUS_UNKNOWN``."""
        if status.done():
            os.close(pidfd)
            return

        def exited() -> None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            if not status.done():
                status.set_result(STATUS_UNKNOWN)

        self._loop.add_reader(pidfd, exited)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close the control socket (the fork server exits on its end of file), then stop it; idempotent."""
        if self._failure is None:
            self._failure = "closed"  # not a fault: no warning
        self._fail("closed")
        await self.process.stop(timeout)
        self._watch.cancel()
        await asyncio.gather(self._watch, return_exceptions=True)
        await self.process.aclose()


def signal_pidfd(pidfd: int) -> None:
    """SIGKILL the process of ``pidfd`` if it still runs."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


def _ints(message: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(message.get(key), int) and not isinstance(message.get(key), bool) for key in keys)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _own_venv(venv_root: Path) -> Path:
    """The fork server's venv (no packages, the host's base interpreter): ``venv_root/.runtime/<it>``; built once."""
    base = os.path.realpath(sys.executable)
    version = sysconfig.get_python_version()
    digest = hashlib.sha256(f"{base}\0{sys.version}".encode()).hexdigest()[:16]
    final = Path(venv_root).absolute() / ".runtime" / f"{_VENV}-{digest}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        (tmp / "bin").mkdir()
        (tmp / "lib" / f"python{version}" / "site-packages").mkdir(parents=True)
        (tmp / "bin" / "python").symlink_to(base)
        (tmp / "pyvenv.cfg").write_text(f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n"
                                        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not python.exists():
            raise
    return python


def _clashes(venv: Path, preloaded: frozenset[str]) -> list[str]:
    """Packages the fork server imported that ``venv`` holds a different version of (by top-level name)."""
    version = sysconfig.get_python_version()
    clashes = []
    for site in {venv / lib / f"python{version}" / "site-packages" for lib in ("lib", "lib64")}:
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        names = {entry.split(".")[0] for entry in entries if not entry.endswith((".dist-info", ".pth"))}
        theirs = {}
        for entry in entries:
            if match := _DIST_INFO.match(entry):
                theirs[_canonical(match["name"])] = match["version"]
        for module in sorted(preloaded & names):
            ours = _host_versions().get(module)
            if ours is None or any(theirs.get(dist) != v for dist, v in ours.items()):
                clashes.append(module)
    return clashes


_versions: dict[str, dict[str, str]] | None = None


def _host_versions() -> dict[str, dict[str, str]]:
    """Top-level module -> {distribution: version} of the host (whose files the runtime links)."""
    global _versions
    if _versions is None:
        found: dict[str, dict[str, str]] = {}
        for module, dists in importlib.metadata.packages_distributions().items():
            versions = {}
            for dist in dists:
                with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                    versions[_canonical(dist)] = importlib.metadata.version(dist)
            found[module] = versions
        _versions = found
    return _versions


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
