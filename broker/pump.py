"""Drive a non-blocking zmq socket from an asyncio event loop with plain callbacks.

zmq.asyncio creates a Future per receive; on the call path that is pure overhead. A pump
registers the socket's file descriptor with ``loop.add_reader`` and drains every queued
message straight into a callback. ZeroMQ's descriptor is edge-triggered and a send can
consume the edge, so after each send the pump checks ``EVENTS`` and schedules a drain itself.
Used by both sides: the broker's ROUTER in the host and the worker's DEALER.

This is the call path's innermost loop, so it talks to pyzmq's compiled socket methods with
plain int flags: the Python-level wrappers (keyword handling, enum flag arithmetic, a
``zmq.Again`` exception at the end of every drain) cost more than the send itself for small
frames. Frames under pyzmq's copy threshold are copied (cheaper than tracking them); larger
ones are sent zero-copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

__all__ = ["SocketPump", "recv_frames_keeping_large"]

logger = logging.getLogger(__name__)

#: Messages handled per drain before yielding to other callbacks on the loop.
_BATCH = 256

_send = zmq.backend.Socket.send  # the compiled methods, without the sugar layer's wrappers
_recv = zmq.backend.Socket.recv
_get: Callable[[Any, int], int] = zmq.backend.Socket.get  # type: ignore[assignment]  # ints for these options
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_COPY_BELOW = zmq.COPY_THRESHOLD


def _send_frames(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send one multipart message without blocking (small frames copied, large ones not)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = type(frame) is bytes and len(frame) < _COPY_BELOW
        _send(sock, frame, _MORE if i < last else _LAST, copy, False)


def _recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """Receive one whole multipart message that is known to be queued.

    Frames come as zmq.Frame objects, whose ``more`` flag is cheaper to read than RCVMORE;
    each is copied out as bytes at once (what a copying receive would do anyway).
    """
    frame = _recv(sock, _LAST, False, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, _LAST, False, False)
        parts.append(frame.bytes)
    return parts


def recv_frames_keeping_large(sock: zmq.Socket[Any]) -> list[Any]:
    """``_recv_frames``, but a frame of ``COPY_THRESHOLD`` bytes or more stays in libzmq's
    buffer, handed on as a read-only memoryview (no copy): for a tcp connection, where large
    values arrive as buffer frames instead of shared memory."""
    parts: list[Any] = []
    while True:
        frame = _recv(sock, _LAST, False, False)
        parts.append(frame.buffer if len(frame) >= _COPY_BELOW else frame.bytes)
        if not frame.more:
            return parts


class SocketPump:
    """Feed messages from ``sock`` to ``on_message`` on ``loop``; send without blocking.

    ``after_drain`` runs after each batch of received messages, and whenever the socket's
    descriptor fires (which it also does when a full outgoing pipe gets room again).
    ``receive`` reads one whole message (a socket that needs a frame's metadata has its own).

    The pump does not own the socket; whoever created the socket closes it after
    ``close()``ing the pump.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[list[bytes]], None],
        after_drain: Callable[[], None] | None = None,
        receive: Callable[[zmq.Socket[Any]], list[bytes]] = _recv_frames,
    ) -> None:
        self._sock = sock
        self._receive = receive
        self._loop = loop
        self._on_message = on_message
        self._after_drain = after_drain
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]  # an int on POSIX
        self._scheduled = False
        self._draining = False
        self._closed = False
        loop.add_reader(self._fd, self._drain)
        # Messages may already be queued (edge already fired before we registered).
        self._schedule()

    def send(self, frames: Sequence[Any]) -> None:
        """Send one multipart message now.

        Raises:
            zmq.Again: the peer's queue is full (high-water mark).
            zmq.ZMQError: EHOSTUNREACH for an unknown peer on a ROUTER_MANDATORY socket.
        """
        try:
            _send_frames(self._sock, frames)
        finally:
            # A send processes pending socket commands and can swallow the read edge. (Inside a
            # drain there is no need to look: the drain reads EVENTS before it stops.)
            if not (self._scheduled or self._draining) and _get(self._sock, _EVENTS) & _POLLIN:
                self._schedule()

    def close(self) -> None:
        """Stop reading; idempotent. Does not close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError, RuntimeError):  # loop already closed
            pass

    def _schedule(self) -> None:
        self._scheduled = True
        self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self._draining = True
        try:
            self._drain_batch()
        finally:
            self._draining = False
        if self._after_drain is not None and not self._closed:
            self._after_drain()

    def _drain_batch(self) -> None:
        sock = self._sock
        for _ in range(_BATCH):
            try:
                if not _get(sock, _EVENTS) & _POLLIN:
                    return
                frames = self._receive(sock)
            except zmq.ZMQError as exc:
                if self._closed or exc.errno in (zmq.ENOTSOCK, zmq.EAGAIN):
                    return
                raise
            try:
                self._on_message(frames)
            except Exception:  # a handler bug must not kill the pump for every other peer
                logger.exception("message handler failed; message dropped")
            if self._closed:
                return
        # Batch exhausted with messages possibly still queued: let other callbacks run.
        self._schedule()
