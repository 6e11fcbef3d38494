"""The broker's tcp listener for workers on other machines, secured with CurveZMQ.

A second ROUTER socket, beside the private ipc one, bound to a tcp endpoint as a CURVE server.
Every connection must complete the CURVE handshake with a key pair whose public half is on the
allowlist: libzmq asks our ZAP handler (``inproc://zeromq.zap.01`` on the broker's own context,
served on the host's loop) before it passes a single frame of the peer up to the socket. A
denied peer's frames never reach the broker, let alone an actor.

The ZAP handler names each allowed key's extension as the connection's ``User-Id``; the broker
reads it from the HELLO frame's metadata and admits the connection only under that name (one
allowed key cannot join as another extension). Routing ids of this socket are tagged
(``REMOTE_TAG + rid``) in the broker's registry, so they never meet those of the ipc socket: a
libzmq-made id is 5 bytes starting with a zero byte, a peer-chosen one never starts with one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from zmq.utils import z85

from .pump import SocketPump

__all__ = ["REMOTE_TAG", "ZAP_DOMAIN", "CurveListener"]

logger = logging.getLogger("pyisolate.broker")

#: Prefix of a remote connection's routing id in the broker's registry (see the module doc).
REMOTE_TAG = b"\x00remote:"
#: The ZAP domain of the listener: a request for any other domain is denied.
ZAP_DOMAIN = "pyisolate"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
#: libzmq's tcp keepalive of each remote connection, at the socket (ZMTP PING/PONG): a dead peer
#: is dropped and a DEALER reconnects without waiting for the kernel's tcp timeout.
_ZMTP_HEARTBEAT_MS = 1000
_ZMTP_TIMEOUT_MS = 5000
#: Refused connections are logged once per this many seconds (the rest only counted).
_LOG_WINDOW = 10.0

_recv = zmq.backend.Socket.recv
_LAST = int(zmq.NOBLOCK)
_COPY_BELOW = zmq.COPY_THRESHOLD

#: Called with ([tagged rid, dest, header, body, *buffers], the extension its key is bound to).
RemoteHandler = Callable[[list[bytes], "str | None"], None]


class CurveListener:
    """A CURVE-server ROUTER on ``endpoint`` and the ZAP handler that checks its peers.

    Args:
        ctx: The broker's context (the ZAP handler must live on the same one).
        loop: The host's event loop.
        endpoint: ``tcp://ADDRESS:PORT`` (port ``*`` or 0: any free port; see ``endpoint``).
        server_secret: The host's CURVE secret key (z85, 40 bytes).
        allowed: Each allowed worker public key (z85, 40 bytes) -> the extension it may join as.
        on_message: Receives each message with its rid tagged and, for a message from a peer
            that has not joined, the name its key is bound to.
        max_message_size: ZMQ_MAXMSGSIZE of the socket.

    The listener owns both sockets; ``close()`` closes them (the broker terminates the context).
    """

    def __init__(self, ctx: zmq.Context[Any], loop: asyncio.AbstractEventLoop, endpoint: str, *,
                 server_secret: bytes, allowed: Mapping[bytes, str], on_message: RemoteHandler,
                 max_message_size: int, sndhwm: int) -> None:
        self._allowed = dict(allowed)
        self._on_message = on_message
        self.authenticated = 0  # CURVE handshakes our ZAP handler let through
        self.denied = 0  # and those it refused (unknown key, wrong mechanism or domain)
        self._logged_at = -_LOG_WINDOW
        self.closed = False
        # The handler first: a CURVE server with no ZAP handler bound lets every key in.
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._sock = ctx.socket(zmq.ROUTER)
        try:
            self._zap.bind(_ZAP_ENDPOINT)
            sock = self._sock
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, sndhwm)
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_TIMEOUT_MS)
            sock.curve_server = True
            sock.curve_secretkey = server_secret
            sock.zap_domain = ZAP_DOMAIN.encode()
            sock.bind(endpoint)
            self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._sock.close(linger=0)
            self._zap.close(linger=0)
            raise
        self._zap_pump = SocketPump(self._zap, loop, self._on_zap)
        self._user: str | None = None  # the User-Id of the message just received
        self.pump = SocketPump(sock, loop, self._on_frames, receive=self._receive)
        logger.debug("broker listening for remote workers on %s (CURVE)", self.endpoint)

    def allow(self, public: bytes, name: str) -> None:
        """Let the worker key ``public`` (z85) join as extension ``name`` from now on (a key the
        host made for one launch: see ``RayPlacement``)."""
        if self._allowed.get(public, name) != name:
            raise ValueError("that key is already bound to another extension")
        self._allowed[public] = name

    def revoke(self, public: bytes) -> None:
        """Refuse the key ``public`` from now on (a connection it made stays until it leaves)."""
        self._allowed.pop(public, None)

    def send(self, frames: list[Any]) -> None:
        """Send ``[raw rid, ...]`` to a remote connection (see ``SocketPump.send``)."""
        self.pump.send(frames)

    def close(self) -> None:
        """Close both sockets; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.pump.close()
        self._zap_pump.close()
        self._sock.close(linger=0)
        self._zap.close(linger=0)

    def _receive(self, sock: zmq.Socket[Any]) -> list[bytes]:
        """Receive one message, keeping the User-Id our ZAP handler gave its connection."""
        frame = _recv(sock, _LAST, False, False)
        parts: list[Any] = [frame.bytes]
        user: str | None = None
        while frame.more:
            frame = _recv(sock, _LAST, False, False)
            if user is None:
                try:
                    got = frame.get("User-Id")
                except zmq.ZMQError:
                    got = ""
                user = got if isinstance(got, str) else ""
            # Large frames (values sent as buffer frames) stay in libzmq's buffer: no copy.
            parts.append(frame.buffer if len(frame) >= _COPY_BELOW else frame.bytes)
        self._user = user or None
        return parts

    def _on_frames(self, frames: list[bytes]) -> None:
        frames[0] = REMOTE_TAG + frames[0]
        self._on_message(frames, self._user)

    def _on_zap(self, frames: list[bytes]) -> None:
        """Answer one ZAP request (RFC 27): 200 with the key's extension as User-Id, or 400."""
        if len(frames) < 6:
            self._zap_pump.send([_ZAP_VERSION, b"", b"500", b"malformed ZAP request", b"", b""])
            return
        version, request_id, domain, _address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        name: str | None = None
        if version == _ZAP_VERSION and domain == ZAP_DOMAIN.encode() and mechanism == b"CURVE" and credentials:
            key = credentials[0]
            if len(key) == 32:
                name = self._allowed.get(z85.encode(key))
        if name is None:
            self.denied += 1
            now = time.monotonic()
            if now - self._logged_at > _LOG_WINDOW:  # a peer retries every 100 ms: log once per window
                self._logged_at = now
                logger.warning("refused a remote connection from %s: its CURVE key is not on the allowlist "
                               "(further refusals in the next %.0f s are only counted: listener.denied)",
                               _address.decode(errors="replace"), _LOG_WINDOW)
            self._zap_pump.send([_ZAP_VERSION, request_id, b"400", b"key not allowed", b"", b""])
            return
        self.authenticated += 1
        self._zap_pump.send([_ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""])
