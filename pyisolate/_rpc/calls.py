"""The calling side of one actor: a CALL out, its one answer in, or a typed failure.

Every call ends exactly once for its caller: with the answer (a value, or a remote exception),
``CallTimeoutError`` (the remote work is asked to cancel), cancellation, ``UnroutableError``
(no such actor, or the broker could not deliver), ``QueueFullError`` (a bounded queue on the
way refused it), or the error that says its target left (crashed, stopped). The slot a call
holds (see ``flow.Slots``) is given back only when its answer arrives or its target is gone,
so a caller that stops waiting does not let more work pile up at a slow target.

Statistics: a target with a ``stats.CallStats`` in ``Calls.stats`` (the host registers one per
extension) has each call's end, latency and bytes counted; other targets cost one dict check.

Context tracking: every CALL carries the chain it belongs to (the actor that started it and a
chain id). A call made while serving another keeps the chain; a chain started by this process
remembers the loop it started on, so a call that comes back to this process (host ->
extension -> host) runs there, and recursion between processes does not deadlock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyisolate.broker.delivery import nbytes
from pyisolate.broker.protocol import QUEUE_FULL, TOO_LARGE, Kind, pack_header, unpack_header

from .._wire import DecodeError
from .._wire import shm as _shm
from ..errors import CallTimeoutError, MessageTooLargeError, ProtocolError, QueueFullError, UnroutableError
from .flow import Acks, Slots
from .serve import CHAIN
from .stats import CallStats
from .values import Values

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = ["Calls"]

#: Sends ``[header, body, *buffers]`` to an actor. Raises LookupError for an unknown one, and
#: QueueFullError or MessageTooLargeError when the way refuses new work.
Send = Callable[[bytes, list[Any]], None]
SendQuiet = Callable[[bytes, list[Any]], None]


class Calls:
    """Calls this actor makes on others: ids, the pending table, slots, timeouts, answers."""

    def __init__(self, origin: str, loop: asyncio.AbstractEventLoop, send: Send, send_quiet: SendQuiet,
                 values: Values, acks: Acks, chain_loops: dict[int, asyncio.AbstractEventLoop],
                 max_in_flight: int) -> None:
        self._origin = origin
        self._loop = loop
        self._send = send
        self._send_quiet = send_quiet
        self._values = values
        self._acks = acks
        self._chain_loops = chain_loops
        self.slots = Slots(loop, max_in_flight)
        self.pending: dict[int, tuple[asyncio.Future[Any], bytes]] = {}
        self._next_id = 0
        self.default_timeout: float | None = None
        self.late_answers = 0  # answers that came after their caller stopped waiting
        self.timeouts = 0
        self.dropped = 0
        #: Counters of calls to some targets (the host's, per extension): see ``stats.CallStats``.
        self.stats: dict[bytes, CallStats] = {}
        #: Why an actor that is no longer connected left, where its owner knows (a worker replaced
        #: by a reload): a call to it fails with that error instead of UnroutableError.
        self.why_gone: Callable[[bytes], BaseException | None] | None = None
        self.open_stream: Callable[[bytes, int], Any]  # set by the Endpoint: a stream answer's consumer
        #: Spans of the calls made (``tracing.Tracing``); None: tracing is off, nothing is done.
        self.tracing: Tracing | None = None
        #: Public names served by another actor (a reloaded extension's current worker), as the
        #: broker said (WELCOME, MOVED): a call by such a name goes to that actor.
        self.moved: dict[bytes, bytes] = {}

    # -- out -------------------------------------------------------------------------------

    def remote_call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    ref_id: int = 0, timeout: float | None = None) -> Any:
        """Return an awaitable of a call on ``target``; usable from any event loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
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
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   ref_id: int = 0, *, origin_loop: asyncio.AbstractEventLoop | None = None,
                   timeout: float | None = None) -> Any:
        """Call ``method`` of ``target`` (or its exported callable ``ref_id``); on this actor's loop."""
        if self.moved and not ref_id:  # an object given out belongs to the worker that gave it, moved or not
            target = self.moved.get(target, target)
        chain = CHAIN.get()
        started = chain is None
        if chain is None:
            self._next_id += 1
            chain = (self._origin, self._next_id)
            self._chain_loops[chain[1]] = origin_loop or self._loop
        self._next_id += 1
        call_id = self._next_id
        stats = self.stats.get(target) if self.stats else None
        began = time.perf_counter() if stats is not None else 0.0
        tracing = self.tracing
        span: Any = None
        field: object = None
        if tracing is not None:  # a CLIENT span, whose trace context rides in the CALL header
            span, field = tracing.client(target, method, ref_id)
        try:
            body, buffers = self._values.encode(target, [list(args), kwargs], origin_loop, "arguments")
            header = self._acks.call_header(target, call_id, method, ref_id, chain, field)
            if timeout is None:
                timeout = self.default_timeout
            if stats is None and span is None:
                return await self._request(target, call_id, header, body, buffers, timeout, method)
            if stats is not None:
                stats.bytes_out += len(body) + (nbytes(buffers) if buffers else 0)
            result = await self._request(target, call_id, header, body, buffers, timeout, method)
        except BaseException as exc:
            if stats is not None:
                stats.ended(method, time.perf_counter() - began, exc)
            if tracing is not None:
                tracing.end(span, exc)
            raise
        finally:
            if started:
                self._chain_loops.pop(chain[1], None)
        if stats is not None:
            stats.ended(method, time.perf_counter() - began, None)
        if tracing is not None:
            tracing.end(span)
        return result

    async def request_stop(self, target: bytes, drain: float = 0.0) -> None:
        """Ask worker ``target`` to run its stop hook and exit; with ``drain``, once the calls it
        serves have ended (waiting at most that many seconds)."""
        self._next_id += 1
        header = pack_header(Kind.STOP, self._next_id, drain) if drain else pack_header(Kind.STOP, self._next_id)
        await self._request(target, self._next_id, header, b"", [], slot=False)

    async def _request(self, target: bytes, call_id: int, header: bytes, body: bytes, buffers: list[Any],
                       timeout: float | None = None, method: str = "", *, slot: bool = True) -> Any:
        slots = self.slots
        if not slot:  # STOP: not work the target queues, so it does not wait behind its calls
            slots.take(target) or slots.force(target)
        elif not slots.take(target):
            if timeout is None:
                await slots.wait(target)
            else:
                began = self._loop.time()
                try:
                    async with asyncio.timeout(timeout):
                        await slots.wait(target)
                except TimeoutError:
                    self.timeouts += 1
                    raise CallTimeoutError(
                        f"{target.decode()}.{method or '?'}() could not even start within {timeout} s: "
                        f"{slots.limit} calls to it were still open (max_in_flight)") from None
                timeout = max(timeout - (self._loop.time() - began), 1e-3)
        future: asyncio.Future[Any] = self._loop.create_future()
        self.pending[call_id] = (future, target)
        try:
            self._send(target, [header, body, *buffers])
        except BaseException as exc:
            del self.pending[call_id]
            slots.release(target)
            if isinstance(exc, LookupError) and not isinstance(exc, UnroutableError):
                why = self.why_gone(target) if self.why_gone is not None else None
                if why is not None:
                    raise why from exc
                raise UnroutableError(f"no actor named {target.decode()!r} is connected") from exc
            raise
        # From here the pending entry and its slot are released by whatever ends the call: its
        # answer (also a late one), or its target leaving. The caller may stop waiting earlier.
        try:
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():  # answered as the time ran out, maybe with
                return future.result()  # a TimeoutError the remote method raised: that is its answer
            self.timeouts += 1
            self._send_quiet(target, [pack_header(Kind.CANCEL, call_id), b""])
            raise CallTimeoutError(
                f"{target.decode()}.{method or '?'}() had no answer within {timeout} s; it was asked to cancel"
            ) from None
        except asyncio.CancelledError:
            if future.cancelled():  # our caller gave up: so does the remote task
                self._send_quiet(target, [pack_header(Kind.CANCEL, call_id), b""])
            raise

    # -- in --------------------------------------------------------------------------------

    def on_answer(self, sender: bytes, kind: Kind, call_id: int, extra: list[object],
                  body: bytes, buffers: list[bytes]) -> None:
        """RESULT or ERROR for one of our calls (a stream's ERROR is the Endpoint's to route)."""
        entry = self.pending.get(call_id)
        if entry is None or entry[1] != sender:  # unknown, or an actor answering another's call
            self._drop(sender, f"answer to unknown call {call_id}")
            return
        del self.pending[call_id]
        self.slots.release(sender)
        if self.stats:
            stats = self.stats.get(sender)
            if stats is not None:
                stats.bytes_in += len(body) + (nbytes(buffers) if buffers else 0)
        try:
            self._answered(sender, kind, call_id, extra, body, buffers, entry[0])
        finally:
            if len(extra) == 2 and type(extra[1]) is list:  # releases riding with it: after the body,
                _shm.unpin(sender, extra[1])  # which may name one of ours that it releases

    def _answered(self, sender: bytes, kind: Kind, call_id: int, extra: list[object], body: bytes,
                  buffers: list[bytes], future: asyncio.Future[Any]) -> None:
        if future.done():  # the caller stopped waiting: timed out or cancelled
            self.late_answers += 1
            try:  # decoded all the same, so what it shares is acknowledged and released
                self._values.decode(body, buffers, sender)
            except DecodeError:
                pass
            return
        if kind is Kind.ERROR:
            future.set_exception(self.decode_error(sender, body, buffers))
        elif extra and extra[0] == "stream":
            future.set_result(self.open_stream(sender, call_id))
        else:
            try:
                future.set_result(self._values.decode(body, buffers, sender))
            except DecodeError as exc:
                future.set_exception(ProtocolError(f"undecodable answer from {sender.decode()!r}: {exc}"))

    def decode_error(self, sender: bytes, body: bytes, buffers: list[bytes]) -> BaseException:
        """The exception an ERROR from ``sender`` carries, or ProtocolError saying why not."""
        try:
            exc = self._values.decode(body, buffers, sender)
        except DecodeError as error:
            return ProtocolError(f"undecodable error from {sender.decode()!r}: {error}")
        if not isinstance(exc, BaseException):
            return ProtocolError(f"{sender.decode()!r} sent an error that is not an exception")
        return exc

    def on_undelivered(self, kind: Kind, extra: list[object], original: bytes) -> None:
        """UNROUTABLE (our CALL was not delivered) or LOST (its answer was not): from the broker."""
        try:
            original_kind, call_id, _ = unpack_header(original)
        except ValueError:
            return
        expected = (Kind.CALL, Kind.STOP) if kind is Kind.UNROUTABLE else (Kind.RESULT, Kind.ERROR)
        entry = self.pending.get(call_id)
        if original_kind not in expected or entry is None:
            return
        peer, reason, code = ([*extra, "?", "?", "?"])[:3]
        if entry[1].decode(errors="replace") != peer:
            return
        del self.pending[call_id]
        self.slots.release(entry[1])
        if entry[0].done():
            return
        what = f"the answer from actor {peer!r}" if kind is Kind.LOST else f"the call to actor {peer!r}"
        error = {QUEUE_FULL: QueueFullError, TOO_LARGE: MessageTooLargeError}.get(str(code), UnroutableError)
        entry[0].set_exception(error(f"{what} was not delivered: {reason}"))

    def fail_peer(self, peer: bytes, exc: BaseException) -> None:
        """``peer`` is gone: each call to it ends with ``exc``, and its slot is free."""
        for call_id, (future, target) in list(self.pending.items()):
            if target == peer:
                del self.pending[call_id]
                self.slots.release(peer)
                if not future.done():
                    future.set_exception(exc)

    def _drop(self, sender: bytes, why: str) -> None:
        self.dropped += 1
