"""The worker's DEALER socket: connect, handshake with the broker, send and receive."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from pyisolate._pump import SocketPump
from pyisolate.broker.protocol import BROKER, PROTOCOL_VERSION, Kind, pack_header, unpack_header

__all__ = ["Connection", "HandshakeError"]

#: How long a final message may take to leave when the worker shuts down.
_FLUSH_SECONDS = 2.0


class HandshakeError(Exception):
    """The broker refused this worker or did not answer."""


class Connection:
    """One DEALER connection to the broker. Owns its context and socket."""

    def __init__(self, endpoint: str) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._pump: SocketPump | None = None
        self.closed = False

    def handshake(self, name: str, secret: bytes, timeout: float) -> None:
        """Introduce ourselves to the broker and wait for WELCOME (blocking: nothing else runs yet).

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

    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[list[bytes]], None]) -> None:
        """Start delivering incoming messages to ``on_message`` on ``loop``."""
        self._pump = SocketPump(self._sock, loop, on_message)

    def send(self, frames: Sequence[Any]) -> None:
        """Send ``[destination, header, body, *buffers]``."""
        if self._pump is None:
            self._sock.send_multipart(frames, copy=False)
        else:
            self._pump.send(frames)

    def close(self, flush: bool = False) -> None:
        """Close the socket (waiting briefly for queued messages if ``flush``); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.close()
        self._sock.close(linger=int(_FLUSH_SECONDS * 1000) if flush else 0)
        self._ctx.term()
