"""The host's side of the control channels: segment descriptors, held for the workers that share them.

Every descriptor passes through the host. A worker PUTs each segment it shares (checked here:
a sealed, fully reserved memfd; at most ``MAX_SEGMENTS_PER_WORKER`` per worker, and within
the process's descriptor budget); the host keeps it until the worker DROPs it or goes away.
A worker GETs the descriptor of a segment someone sent it; the host answers from its loop,
from this table or from its own mappings (ids owned by ``host``). An id not known yet is
looked for by draining its owner's channel first, without blocking: the owner PUT it before
it sent the message naming it. Refusals are counted in ``Hub.refused`` and logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import threading
from collections.abc import Callable

from . import _memfd
from ._channel import BOOT, DROP, FD, GET, MAX_SEGMENTS_PER_WORKER, MISSING, PUT, recv, send
from ._memfd import RefusedHandle

__all__ = ["HostChannel", "Hub"]

logger = logging.getLogger("pyisolate.shm")

#: Messages handled per wake-up of the loop, so that a flooding worker cannot hold it.
_BATCH = 256


class HostChannel:
    """The host's end of one worker's channel, and the descriptors that worker PUT."""

    def __init__(self, hub: Hub, name: str, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._hub = hub
        self._sock = sock
        self._loop = loop
        self.ids: set[str] = set()
        self._deferred: collections.deque[bytes] = collections.deque()  # GETs met while draining
        self.closed = False
        # The worker's end is closed (it exited). What it PUT stays until the host has handled
        # its exit (``Hub.sweep``): an answer it sent just before it died may still be on its
        # way through the broker, and names those segments.
        self.eof = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def send_boot(self, boot: bytes) -> None:
        """Send the bootstrap (the first message; the buffer of a new socket holds it)."""
        send(self._sock, bytes((BOOT,)) + boot)

    def _on_readable(self) -> None:
        with self._hub.lock:
            while self._deferred and not self.closed:
                self._on_get(self._deferred.popleft())
            self.pump(_BATCH, answer=True)

    def pump(self, limit: int | None, answer: bool) -> bool:
        """Handle what is waiting (at most ``limit`` messages); GETs wait unless ``answer``.

        Returns whether the worker's end is closed (end of file): ours stops reading then, and
        closes when the host sweeps it.
        """
        handled = 0
        while not self.closed and not self.eof and (limit is None or handled < limit):
            try:
                data, fds, cut = recv(self._sock)
            except BlockingIOError:
                return False
            except OSError:
                data, fds, cut = b"", [], False
            handled += 1
            if not data and not fds:
                self.eof = True
                self._stop_reading()
                return True
            kind = data[0] if data else 0
            if cut:
                self._refuse("cut message", "too long, or more than one descriptor", fds)
            elif kind == PUT and len(fds) == 1:
                self._on_put(data[1:].decode(errors="replace"), fds[0])
            elif kind == DROP and not fds:
                for segment_id in data[1:].decode(errors="replace").split("\n"):
                    self._hub.release(self, segment_id)
            elif kind == GET and not fds:
                if answer:
                    self._on_get(data)
                else:
                    self._deferred.append(data)
                    self._loop.call_soon_threadsafe(self._on_readable)
            else:
                self._refuse("unexpected message", f"kind {kind} with {len(fds)} descriptors", fds)
        return self.eof

    def _stop_reading(self) -> None:
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (RuntimeError, ValueError):  # the loop is closed: it reads nothing any more
            pass

    def _on_put(self, segment_id: str, fd: int) -> None:
        if segment_id.partition(":")[0] != self.name:
            return self._refuse("PUT of another actor's id", segment_id, [fd])
        if len(self.ids) >= MAX_SEGMENTS_PER_WORKER:
            return self._refuse("PUT beyond the bound", f"{MAX_SEGMENTS_PER_WORKER} segments held", [fd])
        if segment_id in self._hub.fds:
            return self._refuse("PUT of a known id", segment_id, [fd])
        try:
            _memfd.check(fd, 0)
        except (RefusedHandle, OSError) as exc:
            return self._refuse("PUT of a descriptor that is not a sealed memfd", str(exc), [fd])
        if not _memfd.hold():
            return self._refuse("PUT beyond the host's descriptor budget", segment_id, [fd])
        self.ids.add(segment_id)
        self._hub.fds[segment_id] = (self, fd)

    def _on_get(self, data: bytes) -> None:
        request, segment_id = data[1:5], data[5:].decode(errors="replace")
        if len(request) != 4:
            return self._refuse("short GET", "", [])
        fd, close, reason = self._hub.lookup(segment_id)
        try:
            if fd is None:
                self._refuse("GET of an unknown segment", reason, [])
                send(self._sock, bytes((MISSING,)) + request + reason.encode())
            else:
                send(self._sock, bytes((FD,)) + request, fd)
        except OSError:
            pass  # the worker is gone, or does not read: its GET times out
        finally:
            if close and fd is not None:
                os.close(fd)

    def _refuse(self, why: str, detail: str, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        with self._hub.lock:
            self._hub.refused[why] += 1
        logger.debug("worker %r: refused %s: %s", self.name, why, detail)

    def close(self) -> None:
        """Stop reading, close our end and every descriptor the worker PUT; idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.eof:
            self._stop_reading()
        self._sock.close()
        with self._hub.lock:
            for segment_id in list(self.ids):
                self._hub.release(self, segment_id)
            channels = self._hub.channels.get(self.name, [])
            if self in channels:
                channels.remove(self)
                if not channels:
                    del self._hub.channels[self.name]


class Hub:
    """Every worker's channel and the descriptors they PUT; the host's ``Source`` of segments."""

    def __init__(self, own_fd: Callable[[str], int | None]) -> None:
        self.lock = threading.RLock()
        self.channels: dict[str, list[HostChannel]] = {}
        self.fds: dict[str, tuple[HostChannel, int]] = {}
        self.refused: collections.Counter[str] = collections.Counter()
        self._own_fd = own_fd

    def attach(self, name: str, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> HostChannel:
        """Serve worker ``name``'s end of the channel ``sock`` (ours now) on ``loop``."""
        channel = HostChannel(self, name, sock, loop)
        with self.lock:
            self.channels.setdefault(name, []).append(channel)
        return channel

    def release(self, channel: HostChannel, segment_id: str) -> None:
        """Close the descriptor ``channel``'s worker PUT under ``segment_id`` (if it did)."""
        with self.lock:
            entry = self.fds.get(segment_id)
            if entry is None or entry[0] is not channel:
                return
            del self.fds[segment_id]
            channel.ids.discard(segment_id)
        os.close(entry[1])
        _memfd.let_go()

    def lookup(self, segment_id: str) -> tuple[int | None, bool, str]:
        """(descriptor, whether the caller closes it, why not) for a GET of ``segment_id``."""
        owner = segment_id.partition(":")[0]
        if owner == "host":
            fd = self._own_fd(segment_id)
            return fd, True, "the host does not share it (any more)"
        with self.lock:
            if segment_id not in self.fds:
                for channel in list(self.channels.get(owner, ())):
                    channel.pump(None, answer=False)  # the owner PUT it before naming it
            entry = self.fds.get(segment_id)
        if entry is None:
            return None, False, f"no segment {segment_id!r} is shared (its owner let go, or never PUT it)"
        return entry[1], False, ""

    # -- the host's Source ------------------------------------------------------------------

    def fetch(self, segment_id: str) -> int:
        """A descriptor (ours to close) of a segment a worker shared with the host."""
        with self.lock:
            fd, _, reason = self.lookup(segment_id)
            if fd is None:
                raise RefusedHandle(f"segment {segment_id!r}: {reason}")
            try:
                return os.dup(fd)
            except OSError as exc:
                raise RefusedHandle(f"segment {segment_id!r} cannot be opened: {exc.strerror}") from None

    def put(self, segment_id: str, fd: int) -> None:
        """The host's own segments need no PUT: GETs are answered from its mappings."""

    def drop(self, segment_id: str) -> None:
        """Nothing to tell: the host's own descriptors close with their mappings."""

    def sweep(self, name: str | None) -> int:
        """Close the channels of ``name`` (all if None) whose worker is gone; return how many.

        A channel whose worker still runs (another manager's extension of the same name) stays.
        """
        closed = 0
        with self.lock:
            for channel in [c for n, cs in self.channels.items() if name is None or n == name for c in cs]:
                if name is None or channel.eof or channel.pump(None, answer=False):
                    channel.close()
                    closed += 1
        return closed
