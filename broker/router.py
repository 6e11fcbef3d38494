"""The broker: a ROUTER socket on the host's event loop that routes frames by actor name.

It reads only the routing frame of each message: it looks up the destination, replaces it
with the true sender's name and forwards every other frame untouched. Messages for actors
that live in the host (the host itself, later singletons) are handed to their handler in
place, with no socket hop. An unroutable message is answered with UNROUTABLE to its
sender, never dropped silently. The only messages the broker decodes are those addressed
to itself (HELLO).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from pyisolate._pump import SocketPump

from .protocol import BROKER, MAX_HEADER_BYTES, PROTOCOL_VERSION, Kind, pack_header, unpack_header
from .registry import Registry
from .watchdog import LoopWatchdog

__all__ = ["Broker", "LocalHandler"]

logger = logging.getLogger("pyisolate.broker")

#: Called with (sender name, [header, body, *buffers]) for a message to a host-side actor.
LocalHandler = Callable[[bytes, list[bytes]], None]
#: Called with (name, pid) when a worker has joined.
JoinHandler = Callable[[bytes, int], None]


def _cleanup(ctx: zmq.Context[Any], sock: zmq.Socket[Any], ipc_dir: str | None) -> None:
    sock.close(linger=0)
    ctx.term()
    if ipc_dir is not None:
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _sweep_stale_dirs() -> None:
    """Remove ipc directories of brokers whose host process died without cleaning up (SIGKILL)."""
    root = tempfile.gettempdir()
    for entry in os.listdir(root):
        parts = entry.split("-")
        if len(parts) != 3 or parts[0] != "pyisolate" or not parts[1].isdigit():
            continue
        path = os.path.join(root, entry)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


class Broker:
    """Route messages between named actors. Owns its context, socket and ipc directory.

    Must be created on the event loop it serves (the host's).
    """

    def __init__(self, *, block_warning: float | None = 1.0) -> None:
        self._loop = asyncio.get_running_loop()
        self.registry = Registry()
        self._local: dict[bytes, LocalHandler] = {}
        self._on_join: JoinHandler | None = None
        self.dropped = 0
        self._ctx: zmq.Context[Any] = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock = sock
        self._ipc_dir: str | None = None
        try:
            if zmq.has("ipc"):
                _sweep_stale_dirs()
                self._ipc_dir = tempfile.mkdtemp(prefix=f"pyisolate-{os.getpid()}-")  # mode 0700
                sock.bind(f"ipc://{os.path.join(self._ipc_dir, 'broker')}")
            else:
                sock.bind("tcp://127.0.0.1:*")
        except BaseException:
            _cleanup(self._ctx, sock, self._ipc_dir)
            raise
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._finalizer = weakref.finalize(self, _cleanup, self._ctx, sock, self._ipc_dir)
        self._pump = SocketPump(sock, self._loop, self._on_frames)
        self._watchdog = LoopWatchdog(self._loop, block_warning) if block_warning else None
        self.closed = False
        logger.debug("broker listening on %s", self.endpoint)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the broker runs on."""
        return self._loop

    def has_actor(self, name: bytes) -> bool:
        """Whether ``name`` is a host-side actor or a connected worker."""
        return name in self._local or self.registry.rid_of(name) is not None

    def add_local(self, name: bytes, handler: LocalHandler) -> None:
        """Serve the host-side actor ``name`` with ``handler``."""
        if name in self._local or self.registry.rid_of(name) is not None:
            raise ValueError(f"actor name {name.decode()!r} is taken")
        self._local[name] = handler

    def on_join(self, handler: JoinHandler) -> None:
        """Call ``handler(name, pid)`` whenever a worker completes its handshake."""
        self._on_join = handler

    def send(self, dest: bytes, sender: bytes, frames: list[Any]) -> None:
        """Send ``[header, body, *buffers]`` from the host-side ``sender`` to ``dest``.

        A host-side destination is served in place, on the next turn of the loop.

        Raises:
            LookupError: no actor named ``dest`` is connected.
            zmq.Again: the destination's queue is full.
        """
        handler = self._local.get(dest)
        if handler is not None:
            self._loop.call_soon(handler, sender, frames)
            return
        rid = self.registry.rid_of(dest)
        if rid is None:
            raise LookupError(dest.decode(errors="replace"))
        try:
            self._pump.send([rid, sender, *frames])
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise LookupError(dest.decode(errors="replace")) from exc
            raise

    def close(self) -> None:
        """Stop routing and release the socket, context and ipc directory; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.close()
        self._pump.close()
        self._finalizer()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "closed", True):
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)

    # -- routing -------------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 4:
            self._drop("message of %d frames; at least 4 expected", len(frames))
            return
        rid, dest = frames[0], frames[1]
        sender = self.registry.name_of(rid)
        if sender is None:
            if dest == BROKER:
                self._on_hello(rid, frames[2], frames[3])
            else:
                self._drop("message from a connection that has not joined")
            return
        handler = self._local.get(dest)
        if handler is not None:
            handler(sender, frames[2:])
            return
        dest_rid = self.registry.rid_of(dest)
        if dest_rid is not None:
            frames[0] = dest_rid
            frames[1] = sender
            try:
                self._pump.send(frames)
                return
            except zmq.Again:
                reason = "queue full"
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                reason = "disconnected"
        else:
            reason = "no such actor"
        self._unroutable(rid, dest, reason, frames[2])

    def _unroutable(self, rid: bytes, dest: bytes, reason: str, header: bytes) -> None:
        if len(header) > MAX_HEADER_BYTES:
            self._drop("unroutable message with an oversized header")
            return
        reply = [rid, BROKER, pack_header(Kind.UNROUTABLE, 0, dest.decode(errors="replace"), reason), header]
        try:
            self._pump.send(reply)
        except zmq.ZMQError:
            self._drop("cannot tell a sender its message was unroutable")

    def _on_hello(self, rid: bytes, header: bytes, body: bytes) -> None:
        try:
            kind, _, extra = unpack_header(header)
            if len(body) > MAX_HEADER_BYTES:
                raise ValueError("oversized HELLO")
            hello = msgpack.unpackb(body, raw=False)
            if kind is not Kind.HELLO or not isinstance(hello, dict):
                raise ValueError("expected HELLO")
            name, secret, pid = hello["name"], hello["secret"], hello["pid"]
            if not (isinstance(name, str) and isinstance(secret, bytes) and type(pid) is int):
                raise ValueError("HELLO fields have wrong types")
        except (ValueError, KeyError, TypeError) as exc:
            self._drop("malformed HELLO: %s", exc)
            return
        version = extra[0] if extra else None
        if version != PROTOCOL_VERSION:
            self._refuse(rid, f"protocol version {version!r} is not {PROTOCOL_VERSION}: "
                              "the worker runs a different pyisolate than the host")
            return
        admission = self.registry.admit(rid, name.encode(), secret)
        if not admission.ok:
            self._refuse(rid, admission.reason)
            return
        try:
            self._pump.send([rid, BROKER, pack_header(Kind.WELCOME, 0, PROTOCOL_VERSION), b""])
        except zmq.ZMQError:
            self.registry.forget(name.encode())
            return
        logger.debug("actor %r joined (pid %d)", name, pid)
        if self._on_join is not None:
            self._on_join(name.encode(), pid)

    def _refuse(self, rid: bytes, reason: str) -> None:
        logger.warning("refused a connection to the broker: %s", reason)
        try:
            self._pump.send([rid, BROKER, pack_header(Kind.REFUSED, 0, reason), b""])
        except zmq.ZMQError:
            pass

    def _drop(self, why: str, *args: object) -> None:
        self.dropped += 1
        logger.debug("dropped: " + why, *args)
