"""The fork server (zygote): imports torch and the worker runtime once, then forks share_torch workers.

Started by the host (``pyisolate._host.zygote``) as ``python -I -c <bootstrap> RUNTIME_DIR CONTROL_FD``
with the interpreter of a venv of its own that holds no package (so its ``sys.path`` is the
standard library, an empty site-packages and the share_torch runtime directory, as a worker's
is less the worker's own venv). It imports torch and what every worker imports, freezes the
garbage collector's generations (``gc.freeze()``: the children's collections never touch, and
so never copy, the pages these objects live on), checks that it is still one thread with no
CUDA and no numpy, says READY and waits on its control socket.

The control socket is a private ``SOCK_SEQPACKET`` socketpair with the host; one message is one
JSON object (never pickle), each checked as untrusted input::

    zygote -> host  {"op": "ready", "pid": int, "modules": [top-level names imported from the runtime]}
    host -> zygote  {"op": "fork", "id": int, "python": str, "venv": str, "env": {str: str}}
                    + 4 descriptors: the worker's stdin, stdout, stderr, control channel
    zygote -> host  {"op": "forked", "id": int, "pid": int} + 1 descriptor: a pidfd of the worker
                    {"op": "refused", "id": int, "error": str}
                    {"op": "exited", "pid": int, "code": int}    (a worker it reaped; -N: signal N)

End of file on the control socket (the host closed it, or died) ends the zygote. A child takes
its descriptors as 0, 1, 2 and 3 and closes every other one the zygote held; starts its own
session; gets the signal dispositions and mask of a fresh interpreter; its environment; its
venv's site-packages on ``sys.path`` where a spawned worker has them (before the runtime
directory, ``.pth`` files processed); ``sys.executable``, ``sys.prefix`` and ``sys.exec_prefix``
of its venv; then runs the worker's ``main()`` like a spawned worker.
"""

from __future__ import annotations

import array
import functools
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from pyisolate._wire import shm as _shm

from .zygote_numpy import NumpyCheck

__all__ = ["main"]

#: What every worker imports before it serves (``workers.__main__`` and what it imports): loaded
#: once here, so a child has it already.
_PRELOAD = (
    "torch", "asyncio", "json", "logging", "ctypes", "zmq", "zmq.asyncio", "msgpack",
    "pyisolate.workers.__main__", "pyisolate.workers.connection", "pyisolate.workers.loader",
    "pyisolate.workers.logs", "pyisolate.workers.confine", "pyisolate.broker.protocol",
    "pyisolate._base", "pyisolate._rpc", "pyisolate._singleton", "pyisolate._wire", "pyisolate._wire.tensors",
)  # fmt: skip
#: Longest request the host sends (an environment of a few KiB); longer ones are refused.
_MAX_REQUEST = 1 << 20
#: The worker's descriptors, in this order, come with each fork request.
_FDS = ("stdin", "stdout", "stderr", "channel")
_ANCILLARY = socket.CMSG_SPACE(len(_FDS) * array.array("i").itemsize)
#: Exit status of a child that could not become a worker (its reason is on its stderr).
EXIT_NOT_A_WORKER = 7


def main() -> None:
    """Entry point of the fork server."""
    fresh = {sig: signal.getsignal(sig) for sig in signal.valid_signals() if _settable(sig)}
    control = socket.socket(fileno=int(sys.argv[1]))
    control.set_inheritable(False)
    runtime = sys.path[-1]
    with warnings.catch_warnings():  # "Failed to initialize NumPy": there is none here, on purpose
        warnings.simplefilter("ignore")
        for module in _PRELOAD:
            importlib.import_module(module)
    numpy_check = NumpyCheck.find(sys.modules["torch"])
    gc.freeze()  # already disabled by the bootstrap: nothing here runs a collection
    _check_pristine()
    modules = sorted({name.partition(".")[0] for name, module in list(sys.modules.items())
                      if (getattr(module, "__file__", None) or "").startswith(runtime + os.sep)})
    _send(control, {"op": "ready", "pid": os.getpid(), "modules": modules})
    _serve(control, functools.partial(_become_worker, control, fresh=fresh, numpy_check=numpy_check))


def _check_pristine() -> None:
    """Refuse to fork from a process whose state a child could not use: threads (only the
    calling thread survives a fork, holding whatever locks the others held), CUDA (a CUDA
    context cannot cross a fork), or numpy (each extension brings its own; torch remembers on
    first use whether numpy imports, for the life of the process)."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise RuntimeError(f"the fork server runs {len(threads)} threads after its imports; it must run one")
    torch = sys.modules["torch"]
    if torch.cuda.is_initialized():
        raise RuntimeError("the fork server initialised CUDA")
    if "numpy" in sys.modules:
        raise RuntimeError("the fork server imported numpy")


def _settable(sig: signal.Signals) -> bool:
    return sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) is not None


def _send(control: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    control.sendmsg([json.dumps(message).encode()], ancillary)


def _serve(control: socket.socket, become_worker: Callable[[dict[str, Any], list[int]], NoReturn]) -> None:
    """Fork on request, reap the children and report their exits, until end of file."""
    poll = select.poll()  # holds no descriptor of its own, unlike epoll: nothing for a child to inherit
    poll.register(control, select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        for fd, _ in poll.poll():
            if fd != control.fileno():
                pid = children.pop(fd)
                poll.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                _send(control, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            data, ancillary, flags, _ = control.recvmsg(_MAX_REQUEST, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            fds = _shm.descriptors(ancillary)
            if not data and not fds:
                return  # the host is gone, or done with us; the children live on without us
            try:
                request = _request(data, fds, flags)
            except ValueError as exc:
                for received in fds:
                    os.close(received)
                _send(control, {"op": "refused", "id": _request_id(data), "error": str(exc)})
                continue
            try:
                pid = os.fork()
                if pid == 0:
                    become_worker(request, fds)
            finally:
                for received in fds:
                    os.close(received)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            poll.register(pidfd, select.POLLIN)
            _send(control, {"op": "forked", "id": request["id"], "pid": pid}, pidfd)


def _request_id(data: bytes) -> int:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return -1
    return value if isinstance(value, int) else -1


def _request(data: bytes, fds: list[int], flags: int) -> dict[str, Any]:
    """The fork request in ``data``, checked; ValueError says what is wrong with it."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ValueError("the request or its descriptors were cut")
    if len(fds) != len(_FDS):
        raise ValueError(f"a fork request carries {len(_FDS)} descriptors ({', '.join(_FDS)}), not {len(fds)}")
    try:
        request = json.loads(data)
    except ValueError:
        raise ValueError("a request is a JSON object") from None
    if not isinstance(request, dict) or request.get("op") != "fork":
        raise ValueError("the only request is {'op': 'fork', ...}")
    if not isinstance(request.get("id"), int):
        raise ValueError("a fork request needs an integer 'id'")
    for key in ("python", "venv"):
        value = request.get(key)
        if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
            raise ValueError(f"a fork request needs {key!r}, an absolute path")
    env = request.get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v for k, v in env.items()
    ):
        raise ValueError("a fork request's 'env' maps variable names to strings")
    return request


def _become_worker(control: socket.socket, request: dict[str, Any], fds: list[int], *,
                   fresh: dict[signal.Signals, Any], numpy_check: NumpyCheck) -> NoReturn:
    """In the child: become the worker ``request`` describes; never returns."""
    try:
        control.detach()  # its number is closed below; the object must not close it again later
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.dup2(fds[3], 3, inheritable=False)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))  # close_range(2): the zygote's, the received copies
        for sig, handler in fresh.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _take_venv(request["python"], request["venv"], request["env"])
        numpy_check.reset()  # after the venv is on sys.path: its numpy is the one torch gets
        sys.argv = ["-c", "3"]
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_NOT_A_WORKER)
    from pyisolate.workers.__main__ import main as worker_main

    worker_main()  # ends in os._exit
    os._exit(EXIT_NOT_A_WORKER)


def _take_venv(python: str, venv: str, env: dict[str, str]) -> None:
    """Make this process look like ``python -I`` of ``venv`` to the code it runs and the processes it starts."""
    import site
    import sysconfig

    os.environ.clear()
    os.environ.update(env)
    runtime = sys.path[-1]
    own = os.path.normpath(sys.prefix) + os.sep
    # The standard library stays; our own (empty) site-packages and the runtime go, then the
    # venv's site-packages come (with their .pth files), then the runtime again: a spawned
    # worker's order.
    sys.path[:] = [p for p in sys.path if p != runtime and not os.path.normpath(p).startswith(own)]
    sys.executable = python
    sys.prefix = sys.exec_prefix = venv
    site.PREFIXES[:] = [venv]
    # sysconfig noted the fork server's prefixes when it was imported, and caches what it computed.
    sysconfig._PREFIX = sysconfig._EXEC_PREFIX = os.path.normpath(venv)  # type: ignore[attr-defined]
    sysconfig._CONFIG_VARS = None  # type: ignore[attr-defined]
    for directory in site.getsitepackages([venv]):
        if os.path.isdir(directory):
            site.addsitedir(directory)
    sys.path.append(runtime)
    importlib.invalidate_caches()
    spawn = sys.modules.get("multiprocessing.spawn")
    if spawn is not None:  # imported by torch, it noted the zygote's interpreter as the one to start
        spawn.set_executable(python)
