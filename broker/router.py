"""The broker: a ROUTER socket on the host's event loop that routes frames by actor name.

It reads only the routing frame of each message: it looks up the destination, replaces it
with the true sender's name and forwards every other frame untouched. Messages for actors
that live in the host (the host itself, the singletons) are handed to their handler in
place, with no socket hop. A worker is sent only as much as it has room to read (its window,
see ``delivery``); the rest waits in a bounded backlog. A message that cannot be delivered
is answered with UNROUTABLE to its sender (or LOST to the caller, for an answer), never
dropped silently. The only messages the broker decodes are those addressed to itself (HELLO,
CONSUMED, MOVED); it peeks at a header's kind byte only to word a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from pyisolate.errors import MessageTooLargeError, QueueFullError

from .delivery import WINDOW_MESSAGES, Budget, Outbox, nbytes
from .protocol import (
    BROKER,
    MAX_HEADER_BYTES,
    NO_ACTOR,
    PROTOCOL_VERSION,
    QUEUE_FULL,
    REQUESTS,
    TOO_LARGE,
    Kind,
    kind_of_header,
    pack_header,
    unpack_header,
)
from .pump import SocketPump
from .registry import Registry
from .remote import REMOTE_TAG, CurveListener
from .watchdog import LoopWatchdog

__all__ = ["Broker", "LocalHandler"]

logger = logging.getLogger("pyisolate.broker")

#: Called with (sender name, [header, body, *buffers]) for a message to a host-side actor.
LocalHandler = Callable[[bytes, list[bytes]], None]
#: Called with (name, pid) when a worker has joined.
JoinHandler = Callable[[bytes, int], None]
#: Called with the name of a worker whose connection is gone (the socket said so).
LeaveHandler = Callable[[bytes], None]

#: Refused joins logged per window before the rest are only counted (a flood of HELLOs must
#: not flood the log).
_REFUSALS_LOGGED = 5
_REFUSAL_WINDOW = 10.0


def _cleanup(ctx: zmq.Context[Any], sock: zmq.Socket[Any], ipc_dir: str | None,
             listeners: list[CurveListener]) -> None:
    for listener in listeners:
        listener.close()
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

    Args:
        block_warning: Seconds of a blocked loop before the watchdog logs it (None: off).
        max_message_size: Largest message (all frames) it forwards; also each frame's limit
            on the socket (ZMQ_MAXMSGSIZE), so a larger frame is never even allocated.
        max_queued_bytes: Bytes held back, all slow workers together (see ``delivery``).
        max_in_flight: Calls one actor may have open at another; sizes the per-sender queues.
        clock: The time source for log rate limits (tests inject their own).
    """

    def __init__(self, *, block_warning: float | None = 1.0, max_message_size: int = 256 << 20,
                 max_queued_bytes: int = 1 << 30, max_in_flight: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = asyncio.get_running_loop()
        self.registry = Registry()
        self._local: dict[bytes, LocalHandler] = {}
        self._outboxes: dict[bytes, Outbox] = {}
        self._budget = Budget(max_queued_bytes)
        self._per_sender = 2 * max_in_flight + 1024
        self.max_message_size = max_message_size
        self._on_join: JoinHandler | None = None
        self._on_leave: LeaveHandler | None = None
        self._clock = clock
        self._refusals: list[float] = []
        #: Public names whose calls go to another actor: a reloaded extension's name -> the actor of
        #: its serving generation. Workers hold a copy (WELCOME, then MOVED) and resolve by it.
        self.moves: dict[bytes, bytes] = {}
        # Per public name: the workers yet to acknowledge its latest MOVED, and what waits for them.
        self._unsettled: dict[bytes, tuple[set[bytes], asyncio.Future[None]]] = {}
        #: Remote workers' names (announced with ``expect(remote=True)``): no worker here shares
        #: memory with them, so values for them travel as frames. Workers hold a copy (WELCOME, APART).
        self.apart: set[bytes] = set()
        self.refused_joins = 0
        self.dropped = 0
        self.refused = 0
        self._ctx: zmq.Context[Any] = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A worker's window keeps honest traffic far below this; it is a backstop only.
        sock.setsockopt(zmq.SNDHWM, 2 * WINDOW_MESSAGES)
        # libzmq checks each frame's declared size before allocating it, and drops a peer that
        # sends a larger one (noticed at the next send to it: see _lost).
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
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
            _cleanup(self._ctx, sock, self._ipc_dir, [])
            raise
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._listeners: list[CurveListener] = []  # the tcp + CURVE one, once listen() made it
        self._welcome: dict[bytes, bytes] = {}  # a remote worker's WELCOME body (its bootstrap)
        self._finalizer = weakref.finalize(self, _cleanup, self._ctx, sock, self._ipc_dir, self._listeners)
        self._pump = SocketPump(sock, self._loop, self._on_frames, after_drain=self._retry_blocked)
        self._watchdog = LoopWatchdog(self._loop, block_warning) if block_warning else None
        self.closed = False
        logger.debug("broker listening on %s", self.endpoint)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the broker runs on."""
        return self._loop

    @property
    def private_dir(self) -> str | None:
        """The broker's own 0700 directory (its ipc socket lives there), removed when it closes;
        None where ipc is not available (a tcp endpoint)."""
        return self._ipc_dir

    def has_actor(self, name: bytes) -> bool:
        """Whether ``name`` is taken: a host-side actor, a connected worker, or one starting."""
        return name in self._local or self.registry.knows(name)

    def add_local(self, name: bytes, handler: LocalHandler) -> None:
        """Serve the host-side actor ``name`` with ``handler``."""
        if self.has_actor(name):
            raise ValueError(f"actor name {name.decode()!r} is taken")
        self._local[name] = handler

    def expect(self, name: bytes, secret: bytes, *, remote: bool = False, welcome: bytes = b"") -> None:
        """Let a worker join as ``name`` once, with ``secret`` (one namespace with host actors).

        ``remote``: it joins through the CURVE listener instead, with a key the allowlist binds to
        ``name`` (no secret), and its WELCOME carries ``welcome`` (its bootstrap).
        """
        if name in self._local or name == BROKER:
            raise ValueError(f"actor name {name.decode()!r} is taken by an actor of the host")
        if remote and not self._listeners:
            raise ValueError("no remote worker can join: the broker has no tcp listener "
                             "(ExtensionManagerConfig.listen)")
        self.registry.expect(name, secret, remote=remote)
        if remote:
            self._welcome[name] = welcome
        if remote != (name in self.apart):  # told before it can join: senders know before they can send
            (self.apart.add if remote else self.apart.discard)(name)
            self._tell_all(pack_header(Kind.APART, 0, name.decode(), remote))

    def listen(self, endpoint: str, *, server_secret: bytes, allowed: dict[bytes, str]) -> str:
        """Also accept workers on ``endpoint`` (tcp), authenticated with CURVE; see ``remote``.

        ``allowed`` maps each worker public key (z85) to the one extension name it may join as.
        Returns the bound endpoint (with the port chosen, for port ``*``).
        """
        listener = CurveListener(self._ctx, self._loop, endpoint, server_secret=server_secret, allowed=allowed,
                                 on_message=self._on_remote_frames, max_message_size=self.max_message_size,
                                 sndhwm=2 * WINDOW_MESSAGES)
        self._listeners.append(listener)
        return listener.endpoint

    @property
    def listener(self) -> CurveListener | None:
        """The tcp + CURVE listener, if ``listen`` made one (its counters: ``authenticated``, ``denied``)."""
        return self._listeners[0] if self._listeners else None

    def forget(self, name: bytes) -> None:
        """``name`` left (or will not join): unbind it and drop what waits for it; idempotent."""
        self.registry.forget(name)
        self._settle_left(name)
        self._welcome.pop(name, None)
        outbox = self._outboxes.pop(name, None)
        if outbox is not None:
            outbox.close()

    def on_join(self, handler: JoinHandler) -> None:
        """Call ``handler(name, pid)`` whenever a worker completes its handshake."""
        self._on_join = handler

    def on_leave(self, handler: LeaveHandler) -> None:
        """Call ``handler(name)`` when a joined worker's connection is found gone."""
        self._on_leave = handler

    def queued(self, name: bytes) -> int:
        """Messages held back for worker ``name`` (0 for others)."""
        outbox = self._outboxes.get(name)
        return outbox.queued if outbox is not None else 0

    def send(self, dest: bytes, sender: bytes, frames: list[Any], *, urgent: bool = False) -> None:
        """Send ``[header, body, *buffers]`` from the host-side ``sender`` to ``dest``.

        A host-side destination is served in place, on the next turn of the loop. A worker
        gets it when its window has room; until then it waits in the backlog. ``urgent``
        (small control messages: heartbeats) skips the backlog.

        Raises:
            LookupError: no actor named ``dest`` is connected.
            QueueFullError: the backlog refused it (new work only; a refused answer is
                reported to its caller with LOST instead).
            MessageTooLargeError: the message exceeds ``max_message_size``.
        """
        handler = self._local.get(dest)
        if handler is not None:
            self._loop.call_soon(handler, sender, frames)
            return
        outbox = self._outboxes.get(dest)
        if outbox is None:
            raise LookupError(dest.decode(errors="replace"))
        message = [outbox.rid, sender, *frames]
        try:
            if urgent:
                outbox.urgent(message)
                return
            size = nbytes(frames) + len(sender)  # what the worker counts: the sender frame too
            refusal = self._too_large(size) or outbox.offer(sender, message, size)
        except LookupError:
            self._lost(dest)
            raise
        if refusal is None:
            return
        self.refused += 1
        kind = kind_of_header(frames[0])
        if kind in REQUESTS:
            error = MessageTooLargeError if size > self.max_message_size else QueueFullError
            raise error(refusal)
        if kind in (Kind.RESULT, Kind.ERROR):
            code = TOO_LARGE if size > self.max_message_size else QUEUE_FULL
            self._notice(dest, Kind.LOST, frames[0], sender.decode(errors="replace"), refusal, code)
        logger.debug("refused a message from %r to %r: %s", sender, dest, refusal)

    def move(self, public: bytes, actor: bytes) -> asyncio.Future[None]:
        """Calls that workers make by ``public`` go to ``actor`` from now on (a reload's switch);
        ``actor == public`` undoes the move (the extension is gone).

        Every joined worker is told with MOVED and acknowledges it; a worker that joins later
        gets the moves in its WELCOME. The future is done once every worker told has
        acknowledged or left: from then on none of them sends a new call to the name's old
        holder, whose open calls can be waited for and which can then stop.
        """
        if actor == public:
            self.moves.pop(public, None)
        else:
            self.moves[public] = actor
        previous = self._unsettled.pop(public, None)
        if previous is not None and not previous[1].done():  # superseded: the newer move is the one to wait for
            previous[1].set_result(None)
        future: asyncio.Future[None] = self._loop.create_future()
        outboxes = list(self._outboxes.values())
        if not outboxes:
            future.set_result(None)
            return future
        self._unsettled[public] = ({outbox.name for outbox in outboxes}, future)
        self._tell_all(pack_header(Kind.MOVED, 0, public.decode(), actor.decode()))
        return future

    def _tell_all(self, header: bytes) -> None:
        """Send a broker notice to every joined worker, ahead of what waits for each."""
        for outbox in list(self._outboxes.values()):
            self._urgent(outbox, [outbox.rid, BROKER, header, b""])

    def _settle(self, public: bytes, worker: bytes) -> None:
        entry = self._unsettled.get(public)
        if entry is None:
            return
        entry[0].discard(worker)
        if not entry[0]:
            del self._unsettled[public]
            if not entry[1].done():
                entry[1].set_result(None)

    def _settle_left(self, worker: bytes) -> None:
        """``worker`` is gone: no move waits for it any longer."""
        for public in list(self._unsettled):
            self._settle(public, worker)

    def announce_gone(self, name: bytes, body: bytes) -> None:
        """Tell every worker that ``name`` left, with ``body`` (an encoded exception) saying why."""
        header = pack_header(Kind.GONE, 0, name.decode(errors="replace"))
        for outbox in list(self._outboxes.values()):
            if outbox.name != name:
                self._urgent(outbox, [outbox.rid, BROKER, header, body])

    def close(self) -> None:
        """Stop routing and release the socket, context and ipc directory; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.close()
        self._pump.close()
        for outbox in self._outboxes.values():
            outbox.close()
        self._outboxes.clear()
        for _, future in self._unsettled.values():
            if not future.done():
                future.set_result(None)
        self._unsettled.clear()
        self._finalizer()  # closes the listener too

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
            size = nbytes(frames[2:])
            if size > self.max_message_size:
                self._refuse_message(sender, dest, frames, self._too_large(size) or "", TOO_LARGE)
                return
            handler(sender, frames[2:])
            return
        if dest == BROKER:
            self._on_own(sender, frames[2])
            return
        outbox = self._outboxes.get(dest)
        if outbox is None:
            self._refuse_message(sender, dest, frames, "no such actor", NO_ACTOR)
            return
        frames[0] = outbox.rid
        frames[1] = sender
        size = nbytes(frames[1:])
        too_large = self._too_large(size)
        if too_large is not None:
            self._refuse_message(sender, dest, frames, too_large, TOO_LARGE)
            return
        try:
            refusal = outbox.offer(sender, frames, size)
        except LookupError:
            self._lost(dest)
            self._refuse_message(sender, dest, frames, "it left (its connection is gone)", NO_ACTOR)
            return
        if refusal is not None:
            self._refuse_message(sender, dest, frames, refusal, QUEUE_FULL)

    def _on_remote_frames(self, frames: list[bytes], user: str | None) -> None:
        """A message through the CURVE listener (its rid tagged); a HELLO carries the
        extension name the peer's key is bound to."""
        if len(frames) >= 4 and frames[1] == BROKER and self.registry.name_of(frames[0]) is None:
            self._on_hello(frames[0], frames[2], frames[3], user=user or "")
            return
        self._on_frames(frames)

    def _via(self, rid: bytes) -> Callable[[list[Any]], None]:
        """What sends to connection ``rid`` (the ipc socket, or the listener for a tagged rid), and the
        rid that socket knows."""
        if rid.startswith(REMOTE_TAG) and self._listeners:
            send = self._listeners[0].send
            raw = rid[len(REMOTE_TAG):]
            return lambda frames: send([raw, *frames[1:]])
        return self._pump.send

    def _on_own(self, sender: bytes, header: bytes) -> None:
        """A message from a joined worker to the broker itself: CONSUMED, its read totals; MOVED,
        its acknowledgement of a move."""
        try:
            kind, _, extra = unpack_header(header)
        except ValueError as exc:
            self._drop("malformed header to the broker: %s", exc)
            return
        outbox = self._outboxes.get(sender)
        if kind is Kind.CONSUMED and len(extra) == 2 and outbox is not None:
            try:
                outbox.credit(extra[0], extra[1])
            except LookupError:
                self._lost(sender)
        elif kind is Kind.MOVED and len(extra) == 2 and isinstance(extra[0], str) and isinstance(extra[1], str):
            public = extra[0].encode()
            if self.moves.get(public, public) == extra[1].encode():  # an acknowledgement of the latest move
                self._settle(public, sender)
        else:
            self._drop("%s from %r to the broker", kind.name, sender)

    def _too_large(self, size: int) -> str | None:
        if size <= self.max_message_size:
            return None
        return (f"a message of {size} bytes exceeds max_message_size={self.max_message_size}; send large "
                "data as numpy arrays or tensors (shared memory), or raise ExtensionManagerConfig.max_message_size")

    def _refuse_message(self, sender: bytes, dest: bytes, frames: list[Any], reason: str, code: str) -> None:
        """Tell whoever waits on a message that it was not delivered: its sender, or for an
        answer, the caller waiting for it."""
        self.refused += 1
        header = frames[2]
        kind = kind_of_header(header)
        if kind in (Kind.RESULT, Kind.ERROR):
            self._notice(dest, Kind.LOST, header, sender.decode(errors="replace"), reason, code)
        elif kind in (Kind.CALL, Kind.STOP):
            self._notice(sender, Kind.UNROUTABLE, header, dest.decode(errors="replace"), reason, code)
        else:
            self._drop("undeliverable %s from %r to %r: %s", kind, sender, dest, reason)

    def _notice(self, to: bytes, kind: Kind, header: bytes, about: str, reason: str, code: str) -> None:
        """Send a broker notice (UNROUTABLE, LOST) about ``header`` to actor ``to``, wherever it lives."""
        if len(header) > MAX_HEADER_BYTES:
            self._drop("no notice for an oversized header")
            return
        frames = [pack_header(kind, 0, about, reason, code), bytes(header)]
        handler = self._local.get(to)
        if handler is not None:
            self._loop.call_soon(handler, BROKER, frames)
            return
        outbox = self._outboxes.get(to)
        if outbox is None:
            self._drop("notice for %r not sent", to)
            return
        self._urgent(outbox, [outbox.rid, BROKER, *frames])

    def _urgent(self, outbox: Outbox, frames: list[Any]) -> None:
        try:
            outbox.urgent(frames)
        except LookupError:
            self._lost(outbox.name)

    def _retry_blocked(self) -> None:
        """After each drain: outboxes the socket pushed back (Again) may have room again."""
        for outbox in [o for o in self._outboxes.values() if o.blocked]:
            outbox.blocked = False
            try:
                outbox.flush()
            except LookupError:
                self._lost(outbox.name)

    def _lost(self, name: bytes) -> None:
        """The socket says ``name``'s connection is gone (it closed its socket, or sent a frame
        over max_message_size and was cut off): stop routing to it and tell the owner."""
        if self._outboxes.pop(name, None) is None:
            return
        self.registry.forget(name)
        self._settle_left(name)
        logger.debug("actor %r lost its connection to the broker", name.decode(errors="replace"))
        if self._on_leave is not None:
            self._loop.call_soon(self._on_leave, name)

    def _on_hello(self, rid: bytes, header: bytes, body: bytes, *, user: str | None = None) -> None:
        """A join request. ``user``: for a connection through the listener, the extension its key is
        bound to (None: the ipc socket)."""
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
        bname = name.encode()
        if bname in self._local or bname == BROKER:
            self._refuse(rid, f"the name {name!r} belongs to an actor of the host")
            return
        remote = user is not None
        if remote and name != user:
            self._refuse(rid, f"this worker's key is allowed to join as {user!r} only, not as {name!r}")
            return
        admission = self.registry.admit(rid, bname, secret, remote=remote)
        if not admission.ok:
            self._refuse(rid, admission.reason)
            return
        via = self._via(rid)
        try:
            moves = {public.decode(): actor.decode() for public, actor in self.moves.items()}
            apart = sorted(n.decode() for n in self.apart)
            via([rid, BROKER, pack_header(Kind.WELCOME, 0, PROTOCOL_VERSION, moves, apart),
                 self._welcome.pop(bname, b"")])
        except zmq.ZMQError:
            self.registry.forget(bname)
            return
        if remote:
            outbox = Outbox(bname, rid[len(REMOTE_TAG):], self._send_remote, self._budget, self._per_sender)
        else:
            outbox = Outbox(bname, rid, self._send_frames, self._budget, self._per_sender)
        self._outboxes[bname] = outbox
        logger.debug("actor %r joined (pid %d)", name, pid)
        if self._on_join is not None:
            self._on_join(bname, pid)

    def _send_remote(self, frames: list[Any]) -> None:
        """``_send_frames`` for a worker joined through the listener."""
        self._send_frames(frames, self._listeners[0].send)

    def _send_frames(self, frames: list[Any], send: Callable[[list[Any]], None] | None = None) -> None:
        """Send to a worker; zmq.Again when its pipe is full, LookupError when it is gone."""
        try:
            (send or self._pump.send)(frames)
        except zmq.Again:
            raise
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise LookupError("disconnected") from exc
            raise

    def _refuse(self, rid: bytes, reason: str) -> None:
        self.refused_joins += 1
        now = self._clock()
        self._refusals = [t for t in self._refusals if now - t < _REFUSAL_WINDOW]
        if len(self._refusals) < _REFUSALS_LOGGED:
            self._refusals.append(now)
            if len(self._refusals) < _REFUSALS_LOGGED:
                logger.warning("refused a connection to the broker: %s", reason)
            else:
                logger.warning("refused a connection to the broker: %s; further refusals in the next %.0f s "
                               "are only counted", reason, _REFUSAL_WINDOW)
        try:
            self._via(rid)([rid, BROKER, pack_header(Kind.REFUSED, 0, reason), b""])
        except zmq.ZMQError:
            pass

    def _drop(self, why: str, *args: object) -> None:
        self.dropped += 1
        logger.debug("dropped: " + why, *args)
