"""The private control channel between the host and one worker: the bootstrap, and segment descriptors.

An ``AF_UNIX`` ``SOCK_SEQPACKET`` socketpair, made by the host when it spawns the worker; the
worker inherits its end (``pass_fds``; the number is on its command line). No other process can
open it: a socket cannot be reopened through ``/proc/<pid>/fd``, unlike the stdin pipe that
carried the bootstrap before. One message is one datagram::

    host -> worker   BOOT     JSON bootstrap (first, once): name, broker endpoint, launch secret, ...
                     FD       u32 request, one descriptor attached: the answer to GET
                     MISSING  u32 request, reason (UTF-8): GET refused
    worker -> host   PUT      segment id, one descriptor attached: once per segment it shares
                     DROP     segment ids, newline-separated: its mappings of them died
                     GET      u32 request, segment id: "send me this segment's descriptor"

A worker PUTs a segment before it sends the zmq message naming it, so the PUT is already in the
kernel's buffer when anyone asks for it. Descriptors always travel from and to the host, which
checks each one (a sealed memfd) and holds at most ``MAX_SEGMENTS_PER_WORKER`` per worker.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from ._memfd import RefusedHandle

__all__ = ["BOOT", "DROP", "FD", "GET", "descriptors", "MAX_MESSAGE", "MAX_SEGMENTS_PER_WORKER", "MISSING", "PUT",
           "WorkerChannel", "recv", "send"]

BOOT, FD, MISSING, PUT, DROP, GET = 1, 2, 3, 4, 5, 6
#: Longest message a worker may send; the host refuses longer ones (truncated on receipt).
MAX_MESSAGE = 4096
#: Segments one worker may have PUT and not dropped; the host refuses more (and the worker,
#: knowing, sends copies instead).
MAX_SEGMENTS_PER_WORKER = 4096
#: How long a worker waits for the host to answer a GET before the value fails to decode.
GET_TIMEOUT = 10.0
_U32 = struct.Struct("<I")
_FD_SPACE = socket.CMSG_SPACE(_U32.size)


def send(sock: socket.socket, data: bytes, fd: int | None = None, flags: int = 0) -> None:
    """Send one message, with ``fd`` attached if given (may raise BlockingIOError on a full buffer)."""
    ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([data], ancillary, flags)


def recv(sock: socket.socket, size: int = MAX_MESSAGE) -> tuple[bytes, list[int], bool]:
    """Receive one message: its bytes, the descriptors that came with it, and whether it was cut.

    Descriptors beyond the first are closed by the kernel (the control buffer holds one) and
    mark the message cut, like a message longer than ``size``. b"" means end of file.
    """
    data, ancillary, flags, _ = sock.recvmsg(size, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    cut = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return data, descriptors(ancillary), cut


def descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors (SCM_RIGHTS) in ``recvmsg``'s ancillary data; the caller owns them."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class WorkerChannel:
    """The worker's end: read the bootstrap, PUT and DROP segments, GET other actors' segments.

    Thread-safe: one GET at a time (the answer is read by the thread that asked), and a DROP
    from a finalizer in any thread never blocks; one that cannot leave at once leaves with the
    next message.
    """

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # the extension's own subprocesses get no copy
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._request = 0
        self._drops: list[str] = []

    def boot(self, timeout: float) -> dict[str, Any]:
        """Wait for the bootstrap the host sends first (blocking: nothing else runs yet)."""
        data, fds, _ = self._receive(time.monotonic() + timeout, 1 << 20)
        _close(fds)
        if not data or data[0] != BOOT:
            raise RuntimeError("the host sent no bootstrap on the control channel")
        boot: dict[str, Any] = json.loads(data[1:])
        return boot

    def put(self, segment_id: str, fd: int) -> None:
        """Hand the host a descriptor of our segment ``segment_id`` (before naming it in a message).

        Raises:
            OSError: the host is gone, or does not read its end for GET_TIMEOUT seconds.
        """
        with self._lock:
            deadline = time.monotonic() + GET_TIMEOUT
            self._flush(deadline)
            self._send(bytes((PUT,)) + segment_id.encode(), fd, deadline)

    def drop(self, segment_id: str) -> None:
        """Tell the host our mapping of ``segment_id`` died (from a finalizer: never blocks)."""
        self._drops.append(segment_id)  # list.append is atomic: no lock a finalizer could wait on
        if self._lock.acquire(blocking=False):
            try:
                self._flush(None)
            finally:
                self._lock.release()

    def fetch(self, segment_id: str) -> int:
        """The descriptor of another actor's segment, from the host; the caller owns it.

        Raises:
            RefusedHandle: the host does not hold it (unknown id, refused, or its owner let go),
                no answer within GET_TIMEOUT seconds, or the host is gone.
        """
        with self._lock:
            deadline = time.monotonic() + GET_TIMEOUT
            self._request = (self._request + 1) & 0xFFFFFFFF
            try:
                self._flush(deadline)
                self._send(bytes((GET,)) + _U32.pack(self._request) + segment_id.encode(), None, deadline)
                while True:
                    data, fds, _ = self._receive(deadline, MAX_MESSAGE)
                    if not data:
                        raise RefusedHandle("the host closed the control channel")
                    if len(data) >= 5 and data[0] in (FD, MISSING) and _U32.unpack_from(data, 1)[0] == self._request:
                        break
                    _close(fds)  # the late answer of a GET that timed out
            except TimeoutError:
                raise RefusedHandle(f"segment {segment_id!r}: the host did not answer within "
                                    f"{GET_TIMEOUT:.0f} s") from None
            except OSError as exc:
                raise RefusedHandle(f"segment {segment_id!r}: the control channel failed: {exc}") from None
        if data[0] == FD and len(fds) == 1:
            return fds[0]
        _close(fds)
        raise RefusedHandle(f"segment {segment_id!r}: {data[5:].decode(errors='replace') or 'refused'}")

    def close(self) -> None:
        """Close our end; idempotent."""
        self._sock.close()

    def _flush(self, deadline: float | None) -> None:
        """Send pending DROPs (the lock is held); with no deadline, only what leaves at once."""
        while self._drops:
            batch: list[str] = []
            size = 1
            while self._drops and size + len(self._drops[-1]) + 1 <= MAX_MESSAGE:
                batch.append(self._drops.pop())
                size += len(batch[-1]) + 1
            try:
                self._send(bytes((DROP,)) + "\n".join(batch).encode(), None, deadline)
            except (BlockingIOError, TimeoutError):
                self._drops.extend(batch)
                return
            except OSError:
                return  # the host is gone: nothing to tell it

    def _send(self, data: bytes, fd: int | None, deadline: float | None) -> None:
        while True:
            try:
                return send(self._sock, data, fd)
            except BlockingIOError:
                if deadline is None:
                    raise
                self._wait(select.POLLOUT, deadline)

    def _receive(self, deadline: float, size: int) -> tuple[bytes, list[int], bool]:
        while True:
            try:
                return recv(self._sock, size)
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)

    def _wait(self, event: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        poller = select.poll()
        poller.register(self._sock, event)
        poller.poll(remaining * 1000)
