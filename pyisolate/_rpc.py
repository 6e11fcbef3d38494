"""Endpoint: one actor's calls, the objects it serves, its references and streams.

The same class runs in the host (one per host-side actor: ``host`` and each singleton) and
in every worker (one, named after the extension). It lives on the event loop that owns the
socket; calls from other loops or threads are handed to it. Each CALL gets exactly one
answer: RESULT (a value, or "stream" followed by ITEMs) or ERROR.

Context tracking: every CALL carries the chain it belongs to (the actor that started it and
a chain id). A call served while handling another keeps the chain; when a chain started by
this process comes back to it (host -> extension -> host), the call runs on the event loop
where the chain started, so recursion between processes does not deadlock and two host loops
in two threads each get their own chains back.

Its halves live beside it: serving calls (``_rpc_serve``), streams (``_rpc_streams``) and
flow control, in-flight slots and shared-memory acknowledgements (``_rpc_flow``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

from pyisolate.broker.protocol import Kind, pack_header, unpack_header

from . import _shm
from ._codec import DecodeError, decode, encode
from ._refs import FLAG_ACTOR, FLAG_ASYNC, ActorProxy, ExportTable, RefProxy, is_async_callable
from ._dispatch import public_methods, resolve_method
from ._rpc_flow import FlowEndpoint
from ._rpc_serve import CHAIN, ServeEndpoint
from ._rpc_streams import StreamEndpoint
from ._streams import Producer, RemoteStream
from .errors import CallTimeoutError, EncodeError, ProtocolError, UnroutableError

__all__ = ["CHAIN", "Endpoint", "public_methods", "resolve_method"]  # the last two: re-exported

logger = logging.getLogger("pyisolate.rpc")

#: Sends ``[header, body, *buffers]`` to an actor.
Send = Callable[[bytes, list[Any]], None]
#: Receives kinds the endpoint does not handle itself (READY, LOAD_FAILED, STOP, EVENT).
Control = Callable[[bytes, Kind, int, list[object], bytes, list[bytes]], None]


class Endpoint(ServeEndpoint, StreamEndpoint, FlowEndpoint):
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
    ) -> None:
        self.name = name
        self.loop = loop
        self._methods: dict[str, tuple[Callable[..., Any], int]] = {}
        self.root = root
        self._send = send
        self._origin = (origin or name).decode()  # chains this process starts carry this name
        self._chain_loops = chain_loops if chain_loops is not None else {}
        self._on_control = on_control
        self._pending: dict[int, tuple[asyncio.Future[Any], bytes]] = {}
        self._next_id = 0
        self.exports = ExportTable()
        self._proxies: dict[tuple[bytes, int], weakref.ref[RefProxy]] = {}
        self._producers: dict[tuple[bytes, int], Producer] = {}
        self._streams: weakref.WeakValueDictionary[tuple[bytes, int], RemoteStream] = weakref.WeakValueDictionary()
        self._executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix=f"pyisolate-{name.decode()}")
        self.host_actors: frozenset[bytes] = frozenset()  # worker: actors living in the host
        self.shm_dest = b""
        self.shm_sender = ""
        self.shm_sender_in_host = False
        self.shm_acks: list[str] = []
        self._enc_dest = b""
        self._enc_loop: asyncio.AbstractEventLoop | None = None
        self._enc_seen: dict[int, tuple[str, int, int]] = {}
        self._dec_seen: set[tuple[bytes, int]] = set()
        self.dropped = 0
        self.late_answers = 0  # answers that came after their call timed out or was cancelled
        self.timeouts = 0
        self.default_timeout: float | None = None
        # Backpressure: calls in flight per target are capped below the socket's high-water
        # mark; callers beyond the cap wait here, so nothing is queued without bound or dropped.
        self.max_in_flight = 512
        self._in_flight: dict[bytes, int] = {}
        self._slot_waiters: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self.answers_heartbeats = True
        self._serving: dict[tuple[bytes, int], asyncio.Task[Any] | concurrent.futures.Future[Any]] = {}
        # Segments received in a CALL, acknowledged with its answer (no ACK message of their own).
        self._call_acks: dict[tuple[bytes, int], list[str]] = {}
        # Segments received in answers, events and items, acknowledged with the next CALL to
        # their sender (or an ACK message at the end of this turn of the loop).
        self._owed_acks: dict[bytes, list[str]] = {}

    @property
    def root(self) -> object:
        """The object whose public methods this actor serves (ref 0); None for none."""
        return self._root

    @root.setter
    def root(self, value: object) -> None:
        self._root = value
        self._methods = {}  # bound methods of the old root

    # -- calling -----------------------------------------------------------------------------

    def remote_call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    ref_id: int = 0, timeout: float | None = None) -> Any:
        """Return an awaitable of a call on ``target``; usable from any event loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return self.call(target, method, args, kwargs, ref_id, timeout=timeout)
        if running is None:
            raise RuntimeError(
                "a remote call from a thread without an event loop must block: "
                "use pyisolate.sync(proxy).method(...) there"
            )
        return self._call_from(running, target, method, args, kwargs, ref_id, timeout)

    async def _call_from(self, running: asyncio.AbstractEventLoop, target: bytes, method: str,
                         args: tuple[Any, ...], kwargs: dict[str, Any], ref_id: int, timeout: float | None) -> Any:
        coro = self.call(target, method, args, kwargs, ref_id, origin_loop=running, timeout=timeout)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   ref_id: int = 0, *, origin_loop: asyncio.AbstractEventLoop | None = None,
                   timeout: float | None = None) -> Any:
        """Call ``method`` of ``target`` (or of its exported object ``ref_id``); on ``self.loop``."""
        chain = CHAIN.get()
        started = chain is None
        if chain is None:
            self._next_id += 1
            chain = (self._origin, self._next_id)
            self._chain_loops[chain[1]] = origin_loop or self.loop
        self._next_id += 1
        call_id = self._next_id
        try:
            body, buffers = self._encode(target, [list(args), kwargs], origin_loop)
            header = self._call_header(target, call_id, method, ref_id, chain)
            if timeout is None:
                timeout = self.default_timeout
            return await self._request(target, call_id, header, body, buffers, timeout, method)
        finally:
            if started:
                self._chain_loops.pop(chain[1], None)

    async def request_stop(self, target: bytes) -> None:
        """Ask worker ``target`` to run its stop hook and exit."""
        self._next_id += 1
        await self._request(target, self._next_id, pack_header(Kind.STOP, self._next_id), b"", [])

    async def _request(self, target: bytes, call_id: int, header: bytes, body: bytes, buffers: list[Any],
                       timeout: float | None = None, method: str = "") -> Any:
        if self._in_flight.get(target, 0) >= self.max_in_flight:
            await self._wait_for_slot(target)
        self._in_flight[target] = self._in_flight.get(target, 0) + 1
        future: asyncio.Future[Any] = self.loop.create_future()
        self._pending[call_id] = (future, target)
        try:
            try:
                self._send(target, [header, body, *buffers])
            except LookupError as exc:
                raise UnroutableError(f"no actor named {target.decode()!r} is connected") from exc
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            if not future.cancelled():
                raise  # the remote method itself raised TimeoutError
            self.timeouts += 1
            self._send_quiet(target, [pack_header(Kind.CANCEL, call_id), b""])
            raise CallTimeoutError(
                f"{target.decode()}.{method or '?'}() had no answer within {timeout} s; it was asked to cancel"
            ) from None
        except asyncio.CancelledError:
            if future.cancelled():  # our caller gave up: so does the remote task
                self._send_quiet(target, [pack_header(Kind.CANCEL, call_id), b""])
            raise
        finally:
            self._pending.pop(call_id, None)
            self._free_slot(target)

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
            body, buffers = self._encode(dest, value, None)
        except EncodeError:
            if not from_thread:
                raise  # the emitter is right here to receive it
            logger.error("event %r dropped: its value cannot be sent", name, exc_info=True)
            return
        self._send(dest, [pack_header(Kind.EVENT, 0, name), body, *buffers])

    def fail_peer(self, peer: bytes, exc: BaseException) -> None:
        """``peer`` is gone: fail calls to it, end its streams, release what it held."""
        for future, target in list(self._pending.values()):
            if target == peer and not future.done():
                future.set_exception(exc)
        for (owner, _), stream in list(self._streams.items()):
            if owner == peer:
                stream.end(exc)
        for (owner, _), producer in list(self._producers.items()):
            if owner == peer:
                producer.close()
        self.exports.drop_receiver(peer)
        for key in [k for k in self._call_acks if k[0] == peer]:
            del self._call_acks[key]
        self._owed_acks.pop(peer, None)
        _shm.drop_peer(peer)

    async def aclose(self) -> None:
        """Cancel what is still being served and release the thread pool; idempotent."""
        tasks = [t for t in self._serving.values() if isinstance(t, asyncio.Task)]
        for task in tasks:
            task.cancel()
        for producer in list(self._producers.values()):
            producer.close()
        pending = [*tasks, *(p.task for p in self._producers.values())]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- references (the codec's RefHooks) ------------------------------------------------------

    def _encode(self, dest: bytes, value: object, loop: asyncio.AbstractEventLoop | None) -> tuple[bytes, list[Any]]:
        self._enc_dest, self._enc_loop, self._enc_seen = dest, loop, {}
        self.shm_dest = dest
        try:
            return encode(value, self)
        except BaseException:
            for _, ref_id, _ in self._enc_seen.values():  # the message is not sent: undo its counts
                self.exports.release(ref_id, dest, 1)
            raise
        finally:
            self._enc_seen = {}

    def export(self, obj: object) -> tuple[str, int, int] | None:
        if isinstance(obj, RefProxy):
            owner = obj._pyisolate_owner
            if owner != self._enc_dest:
                raise EncodeError(
                    f"{obj!r} was received from {owner.decode()!r} and can only be passed back to it"
                )
            return owner.decode(), obj._pyisolate_ref, obj._pyisolate_flags
        if isinstance(obj, ActorProxy):
            return obj._pyisolate_owner.decode(), 0, FLAG_ACTOR
        if isinstance(obj, type) or not callable(obj):
            return None
        ref = self._enc_seen.get(id(obj))
        if ref is None:
            ref_id = self.exports.add(obj, self._enc_dest, self._enc_loop)
            ref = (self.name.decode(), ref_id, FLAG_ASYNC if is_async_callable(obj) else 0)
            self._enc_seen[id(obj)] = ref
        return ref

    def _decode(self, body: bytes, buffers: list[bytes], sender: bytes, acks: list[str] | None = None) -> object:
        """Decode a message from ``sender``. Shared-memory segments it names are acknowledged at
        once with ACK, or, given ``acks`` (a CALL's), collected there to travel with the answer."""
        self._dec_seen = set()
        self.shm_sender = sender.decode()
        self.shm_sender_in_host = sender in self.host_actors
        received: list[str] = [] if acks is None else acks
        self.shm_acks = received
        try:
            return decode(body, buffers, self)
        finally:
            if received and acks is None:  # we hold our own names for these segments now: unpin
                self._owe_acks(sender, received)

    def resolve(self, owner: str, ref_id: int, flags: int) -> object:
        name = owner.encode()
        if flags & FLAG_ACTOR:
            return ActorProxy(name, self.remote_call)
        if name == self.name:  # one of ours, coming back
            export = self.exports.get(ref_id)
            if export is None:
                raise DecodeError(f"reference {ref_id} of {owner!r} is unknown or released")
            return export.obj
        key = (name, ref_id)
        entry = self._proxies.get(key)
        proxy = entry() if entry is not None else None
        if proxy is None:
            cell = [0]
            proxy = RefProxy(name, ref_id, flags, self.remote_call, cell)
            weakref.finalize(proxy, self._release_soon, name, ref_id, cell)
            self._proxies[key] = weakref.ref(proxy)
        if key not in self._dec_seen:
            self._dec_seen.add(key)
            proxy._pyisolate_cell[0] += 1
        return proxy

    def _release_soon(self, owner: bytes, ref_id: int, cell: list[int]) -> None:
        # A finalizer: it may run in any thread, at any point of the loop's work.
        try:
            self.loop.call_soon_threadsafe(self._release, owner, ref_id, cell[0])
        except RuntimeError:  # loop closed: the owner forgets us when we go
            pass

    def _release(self, owner: bytes, ref_id: int, count: int) -> None:
        entry = self._proxies.get((owner, ref_id))
        if entry is not None and entry() is None:
            del self._proxies[(owner, ref_id)]
        try:
            self._send(owner, [pack_header(Kind.RELEASE, 0, ref_id, count), b""])
        except LookupError:
            pass  # the owner is gone, and its references with it

    # -- receiving -------------------------------------------------------------------------------

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
        body, buffers = frames[1], frames[2:]
        match kind:
            case Kind.CALL:
                self._on_call(sender, call_id, extra, body, buffers)
            case Kind.RESULT | Kind.ERROR:
                self._on_answer(sender, kind, call_id, extra, body, buffers)
            case Kind.ITEM | Kind.END:
                self._on_item(sender, kind, call_id, body, buffers)
            case Kind.CREDIT | Kind.CLOSE:
                self._on_flow(sender, kind, call_id, extra)
            case Kind.CANCEL:
                served = self._serving.pop((sender, call_id), None)
                if served is not None:
                    served.cancel()  # a task cancelled before its first step never answers: no matter
                acks = self._call_acks.pop((sender, call_id), None)
                if acks:
                    self._send_acks(sender, acks)
            case Kind.HEARTBEAT if self.answers_heartbeats:
                self._send_quiet(sender, [pack_header(Kind.HEARTBEAT, call_id), b""])
            case Kind.ACK:
                if extra and isinstance(extra[0], list):
                    _shm.unpin(sender, extra[0])
            case Kind.RELEASE:
                if len(extra) == 2 and type(extra[0]) is int and type(extra[1]) is int:
                    self.exports.release(extra[0], sender, extra[1])
            case Kind.UNROUTABLE:
                self._on_unroutable(extra, body)
            case _ if self._on_control is not None:
                self._on_control(sender, kind, call_id, extra, body, buffers)
            case _:
                self._drop(sender, f"unexpected {kind.name}")

    def _send_quiet(self, dest: bytes, frames: list[Any]) -> None:
        try:
            self._send(dest, frames)
        except LookupError:
            logger.debug("%r left before its answer could be sent", dest)

    def _on_answer(self, sender: bytes, kind: Kind, call_id: int, extra: list[object],
                   body: bytes, buffers: list[bytes]) -> None:
        if len(extra) == 2 and type(extra[1]) is list:  # the acknowledgement of what our CALL shared
            _shm.unpin(sender, extra[1])
        if kind is Kind.ERROR and (stream := self._streams.get((sender, call_id))) is not None:
            stream.end(self._decode_error(sender, body, buffers))  # the stream's generator raised
            return
        entry = self._pending.get(call_id)
        if entry is None or entry[1] != sender:  # late, or an actor answering another's call
            if entry is None and 0 < call_id <= self._next_id:
                self.late_answers += 1
            self._drop(sender, f"answer to unknown call {call_id}")
            return
        future = entry[0]
        if future.done():
            return
        if kind is Kind.ERROR:
            future.set_exception(self._decode_error(sender, body, buffers))
        elif extra and extra[0] == "stream":
            stream = RemoteStream(
                functools.partial(self._send_flow, sender, call_id),
                functools.partial(self._close_soon, sender, call_id),
                self.loop,
            )
            self._streams[(sender, call_id)] = stream
            future.set_result(stream)
        else:
            try:
                future.set_result(self._decode(body, buffers, sender))
            except DecodeError as exc:
                future.set_exception(ProtocolError(f"undecodable answer from {sender.decode()!r}: {exc}"))

    def _decode_error(self, sender: bytes, body: bytes, buffers: list[bytes]) -> BaseException:
        try:
            exc = self._decode(body, buffers, sender)
        except DecodeError as error:
            return ProtocolError(f"undecodable error from {sender.decode()!r}: {error}")
        if not isinstance(exc, BaseException):
            return ProtocolError(f"{sender.decode()!r} sent an error that is not an exception")
        return exc

    def _on_unroutable(self, extra: list[object], original_header: bytes) -> None:
        try:
            _, call_id, _ = unpack_header(original_header)
        except ValueError:
            return
        entry = self._pending.get(call_id)
        if entry is not None and not entry[0].done():
            dest, reason = (extra + ["?", "?"])[:2]
            entry[0].set_exception(UnroutableError(f"cannot reach actor {dest!r}: {reason}"))

    def _drop(self, sender: bytes, why: str) -> None:
        self.dropped += 1
        logger.debug("dropped a message from %r: %s", sender, why)
