"""Endpoint: one actor's RPC machinery, composed of small parts with narrow interfaces.

The same class runs in the host (one per host-side actor: ``host`` and each singleton) and in
every worker (one, named after the extension). It lives on the event loop that owns the
socket; calls from other loops or threads are handed to it. It owns:

- ``values`` (``values.Values``): the codec with references and shared memory accounting;
- ``calls`` (``calls.Calls``): the calls this actor makes, their slots and answers;
- ``server`` (``serve.Server``): the calls made on this actor, each answered once;
- ``streams`` (``streams.Streams``): generators produced and consumed;
- ``acks`` (``flow.Acks``): acknowledgements of shared memory owed to peers.

The Endpoint itself only routes each incoming message to the part that handles its kind.
Broker-only kinds (UNROUTABLE, LOST, GONE) are accepted only from the broker's empty name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyisolate.broker.protocol import BROKER, BROKER_ONLY, Kind, pack_header, unpack_header

from .._wire import DecodeError, TypeRegistry, decode_exception
from .._wire import shm as _shm
from ..errors import PyisolateError
from .calls import Calls
from .flow import Acks
from .refs import ExportTable
from .serve import Server
from .streams import Streams
from .values import Values

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = ["Endpoint"]

logger = logging.getLogger("pyisolate.rpc")

#: Sends ``[header, body, *buffers]`` to an actor.
Send = Callable[[bytes, list[Any]], None]
#: Receives kinds the endpoint does not handle itself (READY, LOAD_FAILED, STOP, EVENT).
Control = Callable[[bytes, Kind, int, list[object], bytes, list[bytes]], None]


class Endpoint:
    """The RPC machinery of one actor."""

    def __init__(
        self,
        name: bytes,
        loop: asyncio.AbstractEventLoop,
        send: Send,
        *,
        root: object = None,
        origin: bytes | None = None,
        chain_loops: dict[int, asyncio.AbstractEventLoop] | None = None,
        on_control: Control | None = None,
        max_in_flight: int = 512,
        max_message_size: int = 256 << 20,
    ) -> None:
        self.name = name
        self.loop = loop
        self._raw_send = send
        self._on_control = on_control
        self.answers_heartbeats = True
        self.dropped = 0
        origin_name = (origin or name).decode()  # chains this process starts carry this name
        loops = chain_loops if chain_loops is not None else {}
        self.acks = Acks(loop, self.send_quiet)
        self.values = Values(name, loop, self.send_quiet, self.remote_call, self.acks, max_message_size)
        self.calls = Calls(origin_name, loop, self._send, self.send_quiet, self.values, self.acks, loops, max_in_flight)
        self.server = Server(name, origin_name, loop, self.send_quiet, self.values, self.acks, loops, max_in_flight)
        self.streams = Streams(loop, self.send_quiet, self.values, self.acks, self.server.send_error, max_in_flight)
        self.server.streams = self.streams
        self.calls.open_stream = self.streams.open
        self.server.root = root

    def _send(self, dest: bytes, frames: list[Any]) -> None:
        """Send a message; releases of references still batched go first, so that a message sent
        after a proxy died never overtakes its RELEASE."""
        if self.values.releases:
            self.values.flush_releases()
        self._raw_send(dest, frames)

    # -- settings and figures --------------------------------------------------------------

    @property
    def root(self) -> object:
        """The object whose public methods this actor serves (ref 0); None for none."""
        return self.server.root

    @root.setter
    def root(self, value: object) -> None:
        self.server.root = value

    @property
    def max_in_flight(self) -> int:
        """Calls this actor may have open at one target, and each caller may have open here."""
        return self.calls.slots.limit

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self.calls.slots.limit = self.server.max_in_flight = self.streams.limit = value

    @property
    def default_timeout(self) -> float | None:
        """Seconds a call may take when it does not say (None: no limit)."""
        return self.calls.default_timeout

    @default_timeout.setter
    def default_timeout(self, value: float | None) -> None:
        self.calls.default_timeout = value

    @property
    def host_actors(self) -> frozenset[bytes]:
        """In a worker: the actors living in the host (their segments are all named ``host``)."""
        return self.values.host_actors

    @host_actors.setter
    def host_actors(self, value: frozenset[bytes]) -> None:
        self.values.host_actors = value

    @property
    def types(self) -> TypeRegistry | None:
        """The application's registered types this actor encodes and decodes (None: none)."""
        return self.values.types

    @types.setter
    def types(self, value: TypeRegistry | None) -> None:
        self.values.types = value

    @property
    def tracing(self) -> Tracing | None:
        """Spans of this actor's calls, made and served (None: tracing is off)."""
        return self.calls.tracing

    @tracing.setter
    def tracing(self, value: Tracing | None) -> None:
        self.calls.tracing = self.server.tracing = value

    @property
    def exports(self) -> ExportTable:
        """The references this actor has handed out."""
        return self.values.exports

    @property
    def late_answers(self) -> int:
        """Answers that arrived after their caller stopped waiting."""
        return self.calls.late_answers

    def pending_calls(self) -> int:
        """Calls of this actor still waiting for an answer (those abandoned by their caller too)."""
        return len(self.calls.pending)

    # -- calling ---------------------------------------------------------------------------

    def remote_call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    ref_id: int = 0, timeout: float | None = None) -> Any:
        """Return an awaitable of a call on ``target``; usable from any event loop."""
        return self.calls.remote_call(target, method, args, kwargs, ref_id, timeout)

    async def call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   ref_id: int = 0, *, timeout: float | None = None) -> Any:
        """Call ``method`` of ``target``, on this actor's loop."""
        return await self.calls.call(target, method, args, kwargs, ref_id, timeout=timeout)

    async def request_stop(self, target: bytes, drain: float = 0.0) -> None:
        """Ask worker ``target`` to run its stop hook and exit (first letting the calls it serves
        end, for at most ``drain`` seconds)."""
        await self.calls.request_stop(target, drain)

    def emit(self, dest: bytes, name: str, value: object) -> None:
        """Send event ``name`` to ``dest`` without waiting; callable from any thread."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._emit(dest, name, value, False)
        else:
            self.loop.call_soon_threadsafe(self._emit, dest, name, value, True)

    def _emit(self, dest: bytes, name: str, value: object, from_thread: bool) -> None:
        try:
            body, buffers = self.values.encode(dest, value, None, "event")
            self._send(dest, [pack_header(Kind.EVENT, 0, name), body, *buffers])
        except (PyisolateError, LookupError):  # EncodeError, QueueFullError, MessageTooLargeError, ...
            if not from_thread:
                raise  # the emitter is right here to receive it
            logger.error("event %r dropped: it cannot be sent", name, exc_info=True)

    def decode(self, body: bytes, buffers: list[bytes], sender: bytes) -> object:
        """Decode a value ``sender`` sent outside a call (an event)."""
        return self.values.decode(body, buffers, sender)

    def send_quiet(self, dest: bytes, frames: list[Any]) -> None:
        """Send a message that answers or steers (not new work): an actor that left is no error."""
        try:
            self._send(dest, frames)
        except LookupError:
            logger.debug("%r left before a message could reach it", dest)

    def fail_peer(self, peer: bytes, exc: BaseException) -> None:
        """``peer`` is gone: fail calls to it, end its streams, release what it held."""
        self.calls.fail_peer(peer, exc)
        self.streams.fail_peer(peer, exc)
        self.values.drop_peer(peer)
        self.server.drop_peer(peer)
        self.acks.drop_peer(peer)
        _shm.drop_peer(peer)

    async def aclose(self) -> None:
        """Cancel what is still being served and release the thread pool; idempotent."""
        await self.streams.aclose()
        await self.server.aclose()

    # -- receiving -------------------------------------------------------------------------

    def on_frames(self, sender: bytes, frames: list[bytes]) -> None:
        """Handle ``[header, body, *buffers]`` from ``sender``."""
        if len(frames) < 2:
            self._drop(sender, "short message")
            return
        try:
            kind, call_id, extra = unpack_header(frames[0])
        except ValueError as exc:
            self._drop(sender, str(exc))
            return
        if (kind in BROKER_ONLY) is not (sender == BROKER):  # only the broker speaks as b""
            self._drop(sender, f"{kind.name} from {'the broker' if sender == BROKER else 'an actor'}")
            return
        body, buffers = frames[1], frames[2:]
        match kind:
            case Kind.CALL:
                self.server.on_call(sender, call_id, extra, body, buffers)
            case Kind.RESULT:
                self.calls.on_answer(sender, kind, call_id, extra, body, buffers)
            case Kind.ERROR:
                if not self.streams.on_error(sender, call_id,
                                             lambda: self.calls.decode_error(sender, body, buffers)):
                    self.calls.on_answer(sender, kind, call_id, extra, body, buffers)
            case Kind.ITEM | Kind.END:
                self.streams.on_item(sender, kind, call_id, body, buffers)
            case Kind.CREDIT | Kind.CLOSE:
                self.streams.on_flow(sender, kind, call_id, extra)
            case Kind.CANCEL:
                self.server.on_cancel(sender, call_id)
            case Kind.HEARTBEAT if self.answers_heartbeats:
                self.send_quiet(sender, [pack_header(Kind.HEARTBEAT, call_id), b""])
            case Kind.ACK:
                if extra and isinstance(extra[0], list):
                    _shm.unpin(sender, extra[0])
            case Kind.RELEASE:
                self.values.on_release(sender, extra, body)
            case Kind.UNROUTABLE | Kind.LOST:
                self.calls.on_undelivered(kind, extra, body)
            case Kind.GONE:
                self._on_gone(extra, body, buffers)
            case Kind.MOVED:
                self._on_moved(extra)
            case Kind.APART:
                if len(extra) == 2 and type(extra[0]) is str and type(extra[1]) is bool:
                    (_shm.apart.add if extra[1] else _shm.apart.discard)(extra[0].encode())
                else:
                    self._drop(BROKER, "malformed APART")
            case _ if self._on_control is not None:
                self._on_control(sender, kind, call_id, extra, body, buffers)
            case _:
                self._drop(sender, f"unexpected {kind.name}")

    def _on_gone(self, extra: list[object], body: bytes, buffers: list[bytes]) -> None:
        """GONE from the broker: an actor left; what concerned it ends with the reason given."""
        if not extra or type(extra[0]) is not str:
            return
        try:
            reason = decode_exception(body, buffers)
        except DecodeError as exc:
            reason = PyisolateError(f"actor {extra[0]!r} left ({exc})")
        self.fail_peer(extra[0].encode(), reason)

    def _on_moved(self, extra: list[object]) -> None:
        """MOVED from the broker: calls by a public name go to another actor (a reload's new
        worker) from now on; acknowledged, so the old one may stop once no caller addresses it."""
        if len(extra) != 2 or type(extra[0]) is not str or type(extra[1]) is not str:
            self._drop(BROKER, "malformed MOVED")
            return
        public, actor = extra[0].encode(), extra[1].encode()
        if actor == public:
            self.calls.moved.pop(public, None)
        else:
            self.calls.moved[public] = actor
        self.send_quiet(BROKER, [pack_header(Kind.MOVED, 0, extra[0], extra[1]), b""])

    def _drop(self, sender: bytes, why: str) -> None:
        self.dropped += 1
        logger.debug("dropped a message from %r: %s", sender, why)
