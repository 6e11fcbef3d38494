"""Drive a non-blocking zmq socket from an asyncio event loop with plain callbacks.

zmq.asyncio creates a Future per receive; on the call path that is pure overhead. A pump
registers the socket's file descriptor with ``loop.add_reader`` and drains every queued
message straight into a callback. ZeroMQ's descriptor is edge-triggered and a send can
consume the edge, so after each send the pump checks ``EVENTS`` and schedules a drain itself.
Used by both sides: the broker's ROUTER in the host and the worker's DEALER.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq

__all__ = ["SocketPump"]

logger = logging.getLogger(__name__)

#: Messages handled per drain before yielding to other callbacks on the loop.
_BATCH = 256


class SocketPump:
    """Feed messages from ``sock`` to ``on_message`` on ``loop``; send without blocking.

    The pump does not own the socket; whoever created the socket closes it after
    ``close()``ing the pump.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[list[bytes]], None],
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._on_message = on_message
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]  # an int on POSIX
        self._scheduled = False
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
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        finally:
            # A send processes pending socket commands and can swallow the read edge.
            if not self._scheduled and cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
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
        recv = self._sock.recv_multipart
        for _ in range(_BATCH):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if self._closed or exc.errno == zmq.ENOTSOCK:
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
