"""The worker's DEALER socket: connect, handshake with the broker, send and receive.

Flow control, both ways:

- Reading: the broker sends this worker only as much as its window allows, and the window
  moves as we report what we have read (CONSUMED, running totals), which we do once a
  quarter of the window has been read, at the end of a batch of messages.
- Writing: when the host's loop is busy the socket's pipe fills (zmq.Again); messages then
  wait here, in order, and leave as soon as the pipe has room. This backlog is bounded in
  bytes: past the bound, new work (a call, an event) fails with QueueFullError at the call
  site, while answers and control messages, which the protocol itself bounds, still queue.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq
from pyisolate.broker.delivery import REPORT_BYTES, REPORT_MESSAGES, nbytes
from pyisolate.broker.protocol import (
    BROKER,
    PROTOCOL_VERSION,
    REQUESTS,
    Kind,
    kind_of_header,
    pack_header,
    unpack_header,
)
from pyisolate.broker.pump import SocketPump, recv_frames_keeping_large

from pyisolate.errors import QueueFullError

__all__ = ["Connection", "HandshakeError"]

#: How long a final message may take to leave when the worker shuts down.
_FLUSH_SECONDS = 2.0
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)


class HandshakeError(Exception):
    """The broker refused this worker or did not answer."""


class Connection:
    """One DEALER connection to the broker. Owns its context and socket.

    Args:
        endpoint: The broker's endpoint.
        max_message_size: Largest frame accepted from the broker (ZMQ_MAXMSGSIZE).
        max_queued_bytes: Bytes that may wait to be sent while the host is not reading.
        curve: For a remote worker: (the host's public key, ours, our secret key), z85; the
            connection is then a CURVE client (see ``pyisolate.broker.remote``).
    """

    def __init__(self, endpoint: str, *, max_message_size: int = -1, max_queued_bytes: int = 1 << 30,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        self._remote = curve is not None  # shares no memory with the host: large values come as frames
        if curve is not None:
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = curve
            # ZMTP pings: a dead tcp peer is noticed by the socket, not only by our heartbeats.
            self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self._sock.connect(endpoint)
        self._pump: SocketPump | None = None
        self._backlog: collections.deque[tuple[Sequence[Any], int]] = collections.deque()
        self._backlog_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        self._read = [0, 0]  # messages and bytes read since the handshake
        self._reported = [0, 0]
        self.closed = False
        self.moves: dict[bytes, bytes] = {}  # from WELCOME: see handshake()
        self.apart: set[bytes] = set()  # from WELCOME: actors on other machines (values go as frames)

    def handshake(self, name: str, secret: bytes, timeout: float) -> bytes:
        """Introduce ourselves to the broker and wait for WELCOME (blocking: nothing else runs yet).
        The moved names it carries (public name -> the actor serving it, see ``Broker.move``)
        are kept in ``moves``, the actors on other machines in ``apart``.

        Returns WELCOME's body: empty, or a remote worker's bootstrap.

        Raises:
            HandshakeError: refused, wrong protocol, or no answer within ``timeout`` seconds.
        """
        hello = msgpack.packb({"name": name, "secret": secret, "pid": os.getpid()}, use_bin_type=True)
        self._sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, PROTOCOL_VERSION), hello])
        if not self._sock.poll(int(timeout * 1000)):
            raise HandshakeError(f"the broker did not answer within {timeout:.0f} s")
        frames = self._sock.recv_multipart()
        if len(frames) < 2 or frames[0] != BROKER:
            raise HandshakeError("unexpected first message from the broker")
        kind, _, extra = unpack_header(frames[1])
        if kind is Kind.REFUSED:
            raise HandshakeError(f"the broker refused this worker: {extra[0] if extra else '?'}")
        if kind is not Kind.WELCOME or not extra or extra[0] != PROTOCOL_VERSION:
            raise HandshakeError(f"the host speaks protocol {extra[:1]}, this worker {PROTOCOL_VERSION}")
        moves = extra[1] if len(extra) > 1 else {}
        if not isinstance(moves, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in moves.items()):
            raise HandshakeError("the broker's WELCOME carries malformed moves")
        self.moves = {k.encode(): v.encode() for k, v in moves.items()}
        apart = extra[2] if len(extra) > 2 else []
        if not isinstance(apart, list) or not all(isinstance(n, str) for n in apart):
            raise HandshakeError("the broker's WELCOME carries a malformed list of remote actors")
        self.apart = {n.encode() for n in apart}
        return frames[2] if len(frames) > 2 else b""

    def read_count(self) -> int:
        """Messages read since the handshake (a remote worker's sign that the host is still there)."""
        return self._read[0]

    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[list[bytes]], None]) -> None:
        """Start delivering incoming messages to ``on_message`` on ``loop``."""
        read = self._read

        def counted(frames: list[bytes]) -> None:
            read[0] += 1
            read[1] += nbytes(frames)
            on_message(frames)

        self._pump = SocketPump(self._sock, loop, counted, after_drain=self._after_drain,
                                **({"receive": recv_frames_keeping_large} if self._remote else {}))

    def send(self, frames: Sequence[Any]) -> None:
        """Send ``[destination, header, body, *buffers]``, or queue it while the pipe is full.

        Raises:
            QueueFullError: the backlog is over ``max_queued_bytes`` and this is new work.
        """
        pump = self._pump
        if pump is None:
            self._sock.send_multipart(frames, copy=False)
            return
        if self.closed:
            return  # the worker is shutting down: what its last tasks send has nowhere to go
        if not self._backlog:
            try:
                pump.send(frames)
                return
            except zmq.Again:
                pass
        size = nbytes(frames)
        if self._backlog_bytes + size > self._max_queued_bytes and kind_of_header(frames[1]) in REQUESTS:
            raise QueueFullError(
                f"this worker's outgoing queue is full: {self._backlog_bytes} bytes wait for the host to read "
                f"them (max_queued_bytes={self._max_queued_bytes}); the host's event loop is not keeping up")
        self._backlog.append((frames, size))
        self._backlog_bytes += size

    def queued(self) -> int:
        """Messages waiting for room in the pipe."""
        return len(self._backlog)

    def _after_drain(self) -> None:
        if self._backlog and int(self._sock.get(_EVENTS)) & _POLLOUT:
            self._flush()
        read, reported = self._read, self._reported
        if read[0] - reported[0] >= REPORT_MESSAGES or read[1] - reported[1] >= REPORT_BYTES:
            reported[:] = read
            self.send([BROKER, pack_header(Kind.CONSUMED, 0, read[0], read[1]), b""])

    def _flush(self) -> None:
        assert self._pump is not None
        backlog = self._backlog
        while backlog:
            frames, size = backlog[0]
            try:
                self._pump.send(frames)
            except zmq.Again:
                return
            backlog.popleft()
            self._backlog_bytes -= size

    def close(self, flush: bool = False) -> None:
        """Close the socket (waiting briefly for queued messages if ``flush``); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.close()
        if flush:
            for frames, _ in self._backlog:  # what waited for room: give it the linger time too
                try:
                    self._sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
        self._backlog.clear()
        self._sock.close(linger=int(_FLUSH_SECONDS * 1000) if flush else 0)
        self._ctx.term()
