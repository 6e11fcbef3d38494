"""Start a worker process, log its output, and stop it with a bounded ladder.

A worker may be started inside a bubblewrap sandbox (``sandbox.bwrap``): then the process the
host starts and holds is bwrap's *monitor*, whose child is the sandbox's pid 1, whose one child
is the worker. The monitor's pid and pidfd stand for the worker (its exit is the worker's, and
killing it kills the whole sandbox); the worker itself is signalled only to ask it to end.

A worker's stdout and stderr reach the host's ``logging``, line by line, under the logger
``pyisolate.extension.<name>`` (and ``extra={"extension": name, "stream": ...}``): stdout lines at
INFO, stderr lines at WARNING, and the worker's own log records (``pyisolate.workers.logs``) at
their real level under ``pyisolate.extension.<name>.<their logger>``. The last stderr lines are
also kept for the error that reports a crash.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyisolate.workers import stacks, tree
from pyisolate.workers.logs import parse_line

from .._envs import LineSplitter
from .._wire import shm as _shm
from ..errors import ExtensionLoadError
from .forked import ForkedProcess, Forker
from .sandbox import bwrap
from .sandbox.launch import Launch, SandboxFailed

__all__ = ["CHILD_VARIABLE", "EXTENSION_LOGGER", "WorkerProcess", "bootstrap", "ensure_fd_headroom", "extension_logger",
           "worker_env"]

logger = logging.getLogger(__name__)

#: The child's first code (``bootstrap``): make the process non-dumpable (PR_SET_DUMPABLE = 4, to 0) before
#: it reads anything secret, so that other processes of the same user cannot read its memory,
#: environment or descriptors through /proc or ptrace; put the host's runtime (pyisolate, zmq,
#: msgpack) at the END of sys.path, after the venv's own site-packages, then run the worker.
#: ``-I`` keeps out PYTHONPATH, user site-packages and the current directory. The cyclic
#: garbage collector stays off while the runtime imports (its passes over the new modules found
#: nothing but cost every start-up several ms); the worker turns it on before any extension
#: code runs. The last argument is the worker's end of its control channel (see ``pyisolate._wire.shm``).
def bootstrap(module: str) -> str:
    """The ``-c`` program that runs ``module``'s ``main()`` as described above (the worker's, the fork server's)."""
    return ("import gc, sys, ctypes; gc.disable(); ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
            f"sys.path.append(sys.argv.pop(1)); from {module} import main; main()")


_BOOTSTRAP = bootstrap("pyisolate.workers.__main__")
#: Set to "1" in every worker's environment (as pyisolate 0.10 did), never in the host's.
CHILD_VARIABLE = "PYISOLATE_CHILD"
# A worker gets a clean environment: these host variables, and those its config names.
# The user's malloc settings (MALLOC_*, GLIBC_TUNABLES) pass: glibc reads them as the worker
# (or the fork server it is forked from) starts.
_PASSED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "SHELL",
                     "GLIBC_TUNABLES"})
_PASSED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "XDG_", "MALLOC_")
_TAIL_LINES = 40
#: After a worker exits, how long to wait for the rest of its output: a grandchild it started
#: may hold the pipes open.
_DRAIN_TIMEOUT = 1.0
#: What one worker holds open in the host: its stdin, stdout and stderr pipes, its control
#: channel, its pidfd, and the broker's end of its connection (accepted once it connects); under
#: bwrap also a pidfd of the sandbox's pid 1 (the pipes to bwrap of a start count as spare).
#: Segments it shares are counted apart, within their own budget (see ``_shm._memfd``).
_FDS_PER_WORKER = 7
#: Distinct logger names of one worker that get a host logger of their own; records of further
#: names go to the extension's logger itself.
_MAX_LOGGERS = 256
#: Lines of one stack dump kept (see ``WorkerProcess.dump_stacks``); a worker's further ones are dropped.
_DUMP_LINES_MAX = 20000
#: Parent of every extension's logger; ``pyisolate.extension.<name>`` carries its output.
EXTENSION_LOGGER = "pyisolate.extension"


def extension_logger(name: str) -> logging.Logger:
    """Return the host logger that receives extension ``name``'s output and log records."""
    return logging.getLogger(f"{EXTENSION_LOGGER}.{name}")
#: Kept free besides: the pipes of a spawn in progress, the broker, and the application's own.
_FDS_SPARE = 32


def ensure_fd_headroom(name: str, connecting: int) -> None:
    """Make sure the host can hold one more worker's file descriptors, or refuse clearly.

    Running out is not a clean failure: libzmq aborts the whole host when the broker cannot
    accept a connection (EMFILE). So before each spawn this counts the descriptors in use,
    plus one for each of ``connecting`` workers spawned but not yet connected, and raises the
    soft RLIMIT_NOFILE (doubling it, up to the hard limit) when a worker would not fit.

    Raises:
        ExtensionLoadError: even the hard limit leaves no room for another worker.
    """
    in_use = _fds_in_use()
    if in_use is None:
        return  # nothing to count with: the limit stands as it is
    needed = in_use + connecting + _FDS_PER_WORKER + _FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        raised = max(needed, soft * 2)
        if hard != resource.RLIM_INFINITY:
            raised = min(raised, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        logger.info("raised this process's open-file limit from %d to %d for extension workers", soft, raised)
        return
    raise ExtensionLoadError(
        f"cannot start extension {name!r}: the host has {in_use} file descriptors open and {connecting} "
        f"workers still connecting, and its limit is {soft} (hard limit {hard}); a worker needs "
        f"{_FDS_PER_WORKER} and {_FDS_SPARE} are kept spare. Raise the limit (ulimit -n) or load fewer "
        "extensions",
        extension=name,
    )


def _fds_in_use() -> int | None:
    """Open file descriptors of this process, or None where /proc cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
    except OSError:
        return None


def worker_env(python: Path, pass_env: Sequence[str] = (), env: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment (see ``WorkerProcess.spawn``), its venv's ``bin`` first on ``PATH``."""
    env = {
        k: v for k, v in os.environ.items()
        if k in _PASSED or k.startswith(_PASSED_PREFIXES) or k in pass_env
    } | (env or {})
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    env[CHILD_VARIABLE] = "1"  # code shared by host and extensions tells the sides apart by it
    return env


class WorkerProcess:
    """One worker process. Owns the process, its pipes and the tasks that read its output.

    And its descendants: the worker kills them on its way out (``pyisolate.workers.exits``);
    where the host has to SIGKILL the worker, it kills the worker's descendants first, and
    once the worker is gone, however it went, what is left of its process group
    (``pyisolate.workers.tree``).
    """

    def __init__(self, name: str, proc: asyncio.subprocess.Process | ForkedProcess,
                 channel: _shm.HostChannel | None = None, *, sandboxed: bool = False,
                 init: tuple[int, int] | None = None, log: logging.Logger | None = None) -> None:
        """Own ``proc``; ``sandboxed``: it is bwrap's monitor, ``init`` its pid 1 (pid, pidfd; now ours).

        ``proc`` is a spawned process, or one the fork server forked (``ForkedProcess``: its
        pidfd came from the fork server, so it is the very process). ``log``: where its output
        goes, by default the extension's logger.
        """
        self.name = name
        self._proc = proc
        self._channel = channel
        self._sandboxed = sandboxed
        self._init = init
        loop = asyncio.get_running_loop()
        # The worker's pidfd, opened at once (it is only reaped once it has exited): it names
        # this process and its process group, never a later one that gets its pid. It also
        # tells when the worker exits, where its pipes do not: a descendant may hold them.
        self._pidfd = proc.take_pidfd() if isinstance(proc, ForkedProcess) else tree.open_pidfd(proc.pid)
        self._exit: asyncio.Future[None] = loop.create_future()
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_exit)
        self._killed: list[int] = []  # pidfds of the descendants the host SIGKILLed
        self._leftovers = asyncio.Lock()
        self._swept = False  # the worker's process group, once, at its first seen exit
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._logger = log or extension_logger(name)
        self._loggers: dict[str, logging.Logger] = {}
        self._dump: list[str] | None = None  # the stack dump being read from stderr
        self._dump_done: asyncio.Event | None = None
        self._dumping = asyncio.Lock()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = (
            loop.create_task(self._follow(proc.stdout, self._on_stdout), name=f"pyisolate-stdout-{name}"),
            loop.create_task(self._follow(proc.stderr, self._on_stderr), name=f"pyisolate-stderr-{name}"),
        )

    @classmethod
    async def spawn(cls, *, name: str, python: Path, runtime: Path, boot: dict[str, Any],
                    pass_env: tuple[str, ...] = (), env: dict[str, str] | None = None,
                    before_boot: Callable[[int], None] | None = None,
                    sandbox: Sequence[str] | None = None, fork_server: Forker | None = None,
                    log: logging.Logger | None = None) -> WorkerProcess:
        """Start ``python`` as a worker and hand it ``boot`` on its private control channel.

        ``before_boot(pid)`` runs once the process exists and before it is sent ``boot``, while
        it waits for it (the worker runs no code of the extension's before its boot message):
        where its resource groups are joined.

        ``sandbox``, bubblewrap's argv prefix ending in ``--``, starts the worker inside it.
        ``before_boot`` then runs for bwrap's monitor and for the sandbox's pid 1, once bwrap
        has built the namespaces and before it starts the worker (``--info-fd`` says pid 1,
        ``--block-fd`` holds it): the worker is forked from pid 1, so it starts in its groups.

        The worker's environment holds only locale, home, temp-dir, accelerator and malloc variables of
        the host, the host variables named in ``pass_env``, and ``env``: no secrets by default;
        and ``PYISOLATE_CHILD=1``, which says it is a worker.
        ``boot`` (the launch secret among it) goes on a socketpair the worker inherits, which no
        other process can open, unlike a pipe (``/proc/<pid>/fd/0``) or the command line.

        ``fork_server`` (not with ``sandbox``): the worker is forked by it, with the same
        environment, descriptors and session as a spawned one; where it has gone, the worker is
        spawned.
        """
        env = worker_env(python, pass_env, env)
        command = [str(python), "-I", "-c", _BOOTSTRAP, str(runtime)]
        launch = Launch(name, sandbox) if sandbox is not None else None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc: asyncio.subprocess.Process | ForkedProcess | None = None
                if fork_server is not None and launch is None:
                    proc = await fork_server.fork(name, python, env, theirs.fileno())
                if proc is None:
                    proc = await asyncio.create_subprocess_exec(
                        *(launch.prefix() if launch is not None else ()), *command, str(theirs.fileno()),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                        env=env,
                        pass_fds=(theirs.fileno(), *(launch.passed() if launch is not None else ())),
                        # Our own session: a Ctrl-C in the terminal reaches the host, which stops us in order.
                        start_new_session=True,
                    )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
                if launch is not None:
                    launch.started()
            # stdin carries nothing: it stays open for the worker's life, and its end-of-file tells
            # the worker the host is gone.
            init: tuple[int, int] | None = None
            try:
                if launch is not None:
                    init = await launch.init(proc.pid)
                    if init is None:
                        raise SandboxFailed  # bwrap exits, and says why on stderr
                    if before_boot is not None:
                        before_boot(proc.pid)
                        before_boot(init[0])
                    launch.release()
                elif before_boot is not None:
                    before_boot(proc.pid)
                channel = _shm.attach_worker(name, ours, asyncio.get_running_loop(), json.dumps(boot).encode())
            except BaseException as exc:
                ours.close()
                failed = cls(name, proc, sandboxed=launch is not None, init=init, log=log)
                await failed.aclose()  # it would wait for a bootstrap that never comes
                if isinstance(exc, SandboxFailed):
                    raise ExtensionLoadError(
                        f"cannot start extension {name!r}: bwrap exited with status {failed.returncode} before it "
                        "built the sandbox (its stderr below)", extension=name, remote_traceback=failed.stderr_tail(),
                    ) from None
                raise
        finally:
            if launch is not None:
                launch.close()
        how = ", under bwrap" if launch is not None else ", forked" if isinstance(proc, ForkedProcess) else ""
        logger.debug("started worker %r (pid %d%s)", name, proc.pid, how)
        return cls(name, proc, channel, sandboxed=launch is not None, init=init, log=log)

    @property
    def pid(self) -> int:
        """The worker's process id; under bwrap, its monitor's (which the worker's exit ends)."""
        return self._proc.pid

    def worker_pid(self) -> int | None:
        """The pid of the worker itself (not bwrap's monitor), in the host's pid namespace; None
        where it is gone or not found."""
        if self._proc.returncode is not None:
            return None
        if self._init is None:
            return self._proc.pid
        worker = self._sandboxed_worker()
        if worker is None:
            return None
        os.close(worker)
        return bwrap.worker_pid(self._init[0])

    async def dump_stacks(self, timeout: float) -> tuple[str, bool]:
        """Every thread's Python stack of the worker, even while its loop is blocked.

        Signals the worker (``workers.stacks``) and reads the dump faulthandler writes to its
        stderr, up to the end marker its main thread writes next, or for ``timeout`` seconds if
        that thread never runs Python again. One dump at a time. Returns the dump and whether
        it ended with the marker (False: it may be cut short).
        """
        async with self._dumping:
            if self._proc.returncode is not None:
                return "", False
            self._dump, self._dump_done = [], asyncio.Event()
            try:
                self.signal_worker(stacks.STACK_SIGNAL)
                try:
                    async with asyncio.timeout(timeout):
                        await self._dump_done.wait()
                    complete = True
                except TimeoutError:
                    complete = False
                return "\n".join(self._dump).strip("\n") + "\n", complete
            finally:
                self._dump = self._dump_done = None

    def signal_worker(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker itself (under bwrap: the sandbox's worker, not its monitor)."""
        if self._init is None:
            self._signal(sig)
            return
        worker = self._sandboxed_worker()
        if worker is None:
            return
        try:
            signal.pidfd_send_signal(worker, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(worker)

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), or None while running."""
        return self._status(self._proc.returncode)

    def _status(self, code: int | None) -> int | None:
        """The worker's exit status from the process's: bwrap's 128+N for signal N is -N.

        (So a worker under bwrap that calls ``exit(137)`` reads as killed by SIGKILL: the
        monitor's status cannot tell them apart.)
        """
        if self._sandboxed and code is not None and 128 < code < 128 + signal.NSIG:
            return 128 - code
        return code

    def stderr_tail(self) -> str:
        """The last lines the worker wrote to stderr (its log records included)."""
        return "\n".join(self._tail)

    async def wait(self) -> int:
        """Wait for exit and for the last of its output; return the exit status."""
        if self._pidfd is not None:
            await asyncio.shield(self._exit)
        else:  # no pidfd: asyncio's wait, which also waits until nothing holds the pipes
            await self._proc.wait()
        await self._end_leftovers()
        await asyncio.wait(self._readers, timeout=_DRAIN_TIMEOUT)  # never cancels them
        self._close_pipes()  # so that asyncio's wait returns once it has the status
        code = self._status(await self._proc.wait())
        assert code is not None
        return code

    def _on_exit(self) -> None:
        assert self._pidfd is not None
        asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self._exit.done():
            self._exit.set_result(None)

    def _close_pipes(self) -> None:
        """Close our ends of the worker's pipes (a process we could not kill may hold the others)."""
        if isinstance(self._proc, ForkedProcess):
            self._proc.close_pipes()
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        # asyncio's Process keeps its transport private; only the pipes are closed, as the
        # subprocess transport's close() may reap the worker behind the child watcher's back.
        transport: asyncio.SubprocessTransport | None = getattr(self._proc, "_transport", None)
        for fd in (1, 2):
            try:
                pipe = transport.get_pipe_transport(fd) if transport is not None else None
            except AttributeError:  # a pipe never connected
                continue
            if pipe is not None:
                pipe.close()

    async def stop(self, timeout: float) -> int:
        """Wait up to ``timeout`` for a requested exit, then SIGTERM, then SIGKILL (descendants first)."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self._proc.returncode is None:
                logger.debug("sending %s to worker %r", sig.name, self.name)
                if sig is signal.SIGKILL:
                    self.kill()
                else:
                    self._terminate()
            try:
                async with asyncio.timeout(timeout):
                    return await self.wait()
            except TimeoutError:
                continue
        return await self.wait()  # SIGKILL cannot be ignored

    def kill(self) -> None:
        """SIGKILL the worker and its descendants now (its exit is reported by whoever waits on it)."""
        if self._pidfd is not None and not tree.exited(self._pidfd):
            # Before the worker: its descendants are found under it (it is their subreaper),
            # and the SIGKILLed worker could not take them along.
            self._killed += tree.kill_descendants(self._proc.pid, self._pidfd)
        self._signal(signal.SIGKILL)

    async def _end_leftovers(self) -> None:
        """The worker is gone: kill what is left of its process group, wait for what we killed."""
        async with self._leftovers:  # whoever waits on the worker also waits for this
            if not self._swept:  # once: the later the sweep, the likelier a pid reused (no pidfd)
                self._swept = True
                tree.kill_group(self._pidfd, self._proc.pid)
            killed, self._killed = self._killed, []
            if killed:
                await _exited(killed, _DRAIN_TIMEOUT)

    def _terminate(self) -> None:
        """SIGTERM the worker, so that its handler takes its descendants along and flushes its output.

        Under bwrap that is the sandbox's worker, not the monitor: the monitor forwards no
        signal, and dies of it, taking the sandbox along at once, SIGKILLed. Where the worker
        cannot be found (not started yet, or gone), the monitor gets it.
        """
        worker = self._sandboxed_worker()
        if worker is None:
            self._signal(signal.SIGTERM)
            return
        try:
            signal.pidfd_send_signal(worker, signal.SIGTERM)
        except ProcessLookupError:
            pass
        finally:
            os.close(worker)

    def _sandboxed_worker(self) -> int | None:
        """A pidfd of the worker inside the sandbox (pid 1's one child), or None."""
        if self._init is None:
            return None
        init, init_fd = self._init
        pid = bwrap.worker_pid(init)
        if pid is None:
            return None
        worker = tree.open_pidfd(pid)
        if worker is None:
            return None
        # Its parent read after its pidfd was opened, then both seen alive: the pid was pid 1's
        # child all along, never another process that got the number since.
        if tree.parent_of(pid) != init or tree.exited(worker) or tree.exited(init_fd):
            os.close(worker)
            return None
        return worker

    def _signal(self, sig: signal.Signals) -> None:
        try:
            if self._pidfd is not None:  # never another process, and never reaps (Popen.send_signal may)
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                self._proc.send_signal(sig)
        except ProcessLookupError:
            pass

    async def aclose(self) -> None:
        """Kill the worker if it still runs, reap it and close its pipes; idempotent."""
        if self._proc.returncode is None:
            self.kill()
        await self.wait()  # the last lines it wrote still reach the log
        if self._channel is not None:
            self._channel.close()
        for reader in self._readers:
            reader.cancel()  # a no-op for a finished reader
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._init is not None:
            os.close(self._init[1])
            self._init = None

    async def _follow(self, stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
        """Hand each line of ``stream`` to ``on_line`` as it arrives, the unfinished last one too."""
        splitter = LineSplitter()
        try:
            while chunk := await stream.read(65536):
                for line in splitter.feed(chunk):
                    on_line(line)
        finally:  # also when cancelled: what was read is not lost
            for line in splitter.flush():
                on_line(line)

    def _on_stdout(self, line: str) -> None:
        self._logger.info(line, extra={"extension": self.name, "stream": "stdout"})

    def _on_stderr(self, line: str) -> None:
        if self._dump is not None and self._dump_done is not None:  # a stack dump is being read
            if line == stacks.END:
                self._dump_done.set()
                return
            if stacks.is_dump_line(line):
                if len(self._dump) < _DUMP_LINES_MAX:
                    self._dump.append(line)
                return
        text, record = parse_line(line)
        if text or record is None:
            self._tail.append(text)
            self._logger.warning(text, extra={"extension": self.name, "stream": "stderr"})
        if record is not None:
            first, *rest = record.message.splitlines() or [""]
            self._tail.append(f"{logging.getLevelName(record.level)} {record.logger}: {first}")
            self._tail.extend(rest)
            logger = self._child_logger(record.logger)
            logger.log(record.level, record.message, extra={"extension": self.name, "stream": "log"})

    def _child_logger(self, name: str) -> logging.Logger:
        """The host logger for the worker's logger ``name``: a child of the extension's logger."""
        logger = self._loggers.get(name)
        if logger is None:
            if name in ("", "root") or len(self._loggers) >= _MAX_LOGGERS:
                return self._logger  # loggers live as long as the host: a worker cannot add without end
            logger = self._loggers[name] = logging.getLogger(f"{self._logger.name}.{name}")
        return logger


async def _exited(pidfds: list[int], timeout: float) -> None:
    """Wait until each process behind ``pidfds`` has exited (at most ``timeout`` s); close them."""
    loop = asyncio.get_running_loop()
    left = set(pidfds)
    all_exited = asyncio.Event()

    def on_exit(fd: int) -> None:  # a pidfd turns readable when its process exits
        loop.remove_reader(fd)
        left.discard(fd)
        if not left:
            all_exited.set()

    try:
        for fd in pidfds:
            loop.add_reader(fd, on_exit, fd)
        async with asyncio.timeout(timeout):
            await all_exited.wait()
    except TimeoutError:
        logger.warning("%d processes SIGKILLed by the host have not exited after %.1f s", len(left), timeout)
    finally:
        for fd in left:
            loop.remove_reader(fd)
        tree.close_pidfds(pidfds)
