"""The admin endpoint: a unix socket through which ``pyisolate top``, ``stack`` and ``profile``
see a running host (``ExtensionManagerConfig(admin=True)`` or ``PYISOLATE_ADMIN=1``).

Where: ``admin`` in the broker's private directory (``$TMPDIR/pyisolate-<host pid>-<random>/``,
mode 0700, removed with the broker), so a client finds hosts by listing those directories.
Who: only processes of the host's own user. The directory's mode keeps others out (root
aside), and every connection's peer credentials (SO_PEERCRED) are checked again: a process of
another uid, root included, gets one refusal and is disconnected.

What: one request per connection, one answer. Each is a frame: a 4-byte big-endian length,
then a msgpack map (no pickle, no extension types). Requests are small and validated field by
field; anything else is answered ``{"ok": False, "error": ...}``:

- ``{"op": "stats"}``: ``manager.stats()`` (see ``pyisolate._host.stats``).
- ``{"op": "pids"}``: the host's pid and each extension's worker pid.
- ``{"op": "stack", "target": NAME}``: every thread's Python stack of extension NAME's worker
  (``"host"``: of the host's own threads, its event loop's among them).

The endpoint is served by a thread of its own, so stats and the host's stacks come even while
the host's event loop is blocked (a worker's stacks are read from its stderr by that loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import selectors
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from .stats import Observed, manager_stats
from .worker import Worker

__all__ = ["AdminServer", "MAX_ANSWER", "SOCKET_NAME", "admin_handler", "peer_uid", "read_frame", "write_frame"]

logger = logging.getLogger("pyisolate")

SOCKET_NAME = "admin"
#: The largest request the host reads, and the largest answer a client reads.
MAX_REQUEST = 4096
MAX_ANSWER = 64 << 20
#: How long one connection may take to send its request and read its answer.
_IO_TIMEOUT = 5.0
#: How long a worker's stack dump may take (see ``WorkerProcess.dump_stacks``), and the host's
#: loop to take the request at all.
_DUMP_TIMEOUT = 2.0
_LOOP_TIMEOUT = _DUMP_TIMEOUT + 3.0
_HEADER = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AdminError(Exception):
    """A request the endpoint cannot answer: its message is the answer's ``error``."""


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of unix socket ``conn`` (SO_PEERCRED)."""
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection mid-frame")
        data += chunk
    return bytes(data)


def read_frame(conn: socket.socket, limit: int) -> Any:
    """Read one frame (length, then msgpack) of at most ``limit`` bytes and decode it.

    Raises:
        ValueError: too large, or not plain msgpack.
        OSError: the connection failed or timed out.
    """
    (size,) = _HEADER.unpack(_recv_exactly(conn, _HEADER.size))
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is over the limit of {limit}")
    data = _recv_exactly(conn, size)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=0,
                               max_str_len=limit, max_array_len=limit, max_map_len=limit)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ValueError(f"not a msgpack value: {exc}") from None


def write_frame(conn: socket.socket, value: Any) -> None:
    """Send ``value`` as one frame (plain msgpack types only)."""
    data = msgpack.packb(value, use_bin_type=True)
    conn.sendall(_HEADER.pack(len(data)) + data)


def _drain(conn: socket.socket) -> None:
    """End our side, then read what the client still sends (a bounded amount) until it closes:
    a unix socket closed with unread data resets the connection, and the client would lose the
    answer it has not read yet."""
    conn.shutdown(socket.SHUT_WR)
    left = MAX_REQUEST + _HEADER.size
    while left > 0 and (chunk := conn.recv(left)):
        left -= len(chunk)


class AdminServer:
    """The listening socket and the thread that answers it. Owns both; ``close()`` ends them."""

    def __init__(self, directory: str, handle: Handler) -> None:
        self.path = os.path.join(directory, SOCKET_NAME)
        self._handle = handle
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self._sock.listen(8)
        except BaseException:
            self._close_sockets()
            raise
        self.refused = 0  # connections of another user, turned away
        self._thread = threading.Thread(target=self._serve, name="pyisolate-admin", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    try:
                        self._answer(conn)
                        _drain(conn)
                    except Exception:  # one bad connection must not end the endpoint
                        logger.debug("admin endpoint: a connection failed", exc_info=True)
                    finally:
                        conn.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(_IO_TIMEOUT)
        uid = peer_uid(conn)
        if uid != os.geteuid():
            self.refused += 1
            logger.warning("admin endpoint: refused a connection from uid %d (only uid %d may attach)",
                           uid, os.geteuid())
            write_frame(conn, {"ok": False, "error": f"refused: uid {uid} is not the host's user"})
            return
        try:
            request = read_frame(conn, MAX_REQUEST)
            answer = self._handle(_checked(request))
        except (ValueError, AdminError) as exc:
            answer = {"ok": False, "error": str(exc)}
        write_frame(conn, answer)

    def close(self) -> None:
        """Stop answering, remove the socket; idempotent."""
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        self._close_sockets()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _close_sockets(self) -> None:
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()


_OPS: dict[str, dict[str, type]] = {"stats": {}, "pids": {}, "stack": {"target": str}}


def _checked(request: object) -> dict[str, Any]:
    """``request`` if it is a well-formed request, else AdminError naming what is wrong."""
    if not isinstance(request, dict):
        raise AdminError(f"a request is a map with an 'op', got {type(request).__name__}")
    op = request.get("op")
    if op not in _OPS:
        raise AdminError(f"unknown op {op!r}; known: {', '.join(sorted(_OPS))}")
    fields = _OPS[op]
    for key, value in request.items():
        if key == "op":
            continue
        if key not in fields:
            raise AdminError(f"op {op!r} takes no field {key!r}")
        if type(value) is not fields[key]:
            raise AdminError(f"field {key!r} of op {op!r} must be a {fields[key].__name__}")
    missing = [key for key in fields if key not in request]
    if missing:
        raise AdminError(f"op {op!r} needs the field(s) {', '.join(missing)}")
    return request


def admin_handler(manager: Observed) -> Handler:
    """What answers the endpoint's requests for ``manager`` (runs in the endpoint's thread)."""

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "stats":
            return {"ok": True, "stats": manager_stats(manager)}
        if op == "pids":
            return {"ok": True, "host": os.getpid(),
                    "extensions": {name: snapshot["pid"]
                                   for name, snapshot in manager_stats(manager)["extensions"].items()}}
        target = request["target"]
        if target == "host":
            return {"ok": True, "text": host_stacks(), "complete": True}
        return {"ok": True, **_worker_stacks(manager, target)}

    return handle


def host_stacks() -> str:
    """Every thread's Python stack in this process, most recent call last (as tracebacks read)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {ident:#x} ({names.get(ident, '?')}), most recent call last:\n"
                     + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def _worker_stacks(manager: Observed, name: str) -> dict[str, Any]:
    backend = manager._extensions.get(name)
    if not isinstance(backend, Worker):
        known = sorted(n for n, b in list(manager._extensions.items()) if isinstance(b, Worker))
        raise AdminError(f"no extension worker named {name!r}; known: {', '.join(known) or 'none'}"
                         + (" (an isolated=False extension runs in the host: ask for 'host')" if backend else ""))
    process = backend.process
    if process is None or process.returncode is not None:
        raise AdminError(f"extension {name!r} has no running worker (state: {backend.status})")
    future = asyncio.run_coroutine_threadsafe(process.dump_stacks(_DUMP_TIMEOUT), manager.loop)
    try:
        text, complete = future.result(_LOOP_TIMEOUT)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise AdminError(f"the host's event loop did not take the request within {_LOOP_TIMEOUT:.0f} s (it is "
                         "blocked: `pyisolate stack host` shows where)") from None
    return {"text": text, "complete": complete, "pid": process.worker_pid()}
