"""The streams of one actor: generators it produces for remote consumers, remote ones it consumes.

A consumer grants the producer a window of items (``_streams.WINDOW``) and more as it takes
them; a producer that sends past what it was granted has broken the protocol, and its stream
ends with ProtocolError at once (the excess is not buffered). Each sender may hold at most
``limit`` producers open here; past that its call fails with QueueFullError.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Any

from pyisolate.broker.protocol import Kind, pack_header

from .._wire import DecodeError
from ..errors import ProtocolError, QueueFullError
from .flow import Acks
from .remote import Producer, RemoteStream
from .values import Values

__all__ = ["Streams"]

#: Sends ``[header, body, *buffers]`` to an actor, never raising for a departed one.
SendQuiet = Callable[[bytes, list[Any]], None]


class Streams:
    """Producers serving remote consumers, and the remote streams this actor consumes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send_quiet: SendQuiet, values: Values, acks: Acks,
                 reply_error: Callable[[bytes, int, BaseException], None], limit: int) -> None:
        self._loop = loop
        self._send_quiet = send_quiet
        self._values = values
        self._acks = acks
        self._reply_error = reply_error
        self.limit = limit
        self._producers: dict[tuple[bytes, int], Producer] = {}
        self._per_sender: dict[bytes, int] = {}
        self._consumed: weakref.WeakValueDictionary[tuple[bytes, int], RemoteStream] = weakref.WeakValueDictionary()

    # -- producing -------------------------------------------------------------------------

    def start(self, peer: bytes, call_id: int, agen: Any) -> None:
        """Answer ``peer``'s call ``call_id`` with a stream of what ``agen`` yields."""
        if self._per_sender.get(peer, 0) >= self.limit:
            self._loop.create_task(agen.aclose())
            self._reply_error(peer, call_id, QueueFullError(
                f"{peer.decode()!r} already consumes {self.limit} streams of this actor (max_in_flight): "
                "close some before opening more"))
            return
        key = (peer, call_id)
        header_item = pack_header(Kind.ITEM, call_id)
        values, send_quiet = self._values, self._send_quiet

        def send_item(item: object) -> None:
            body, buffers = values.encode(peer, item, None, "item")
            send_quiet(peer, [header_item, body, *buffers])

        self._per_sender[peer] = self._per_sender.get(peer, 0) + 1
        self._producers[key] = Producer(
            agen,
            send_item,
            lambda: send_quiet(peer, [pack_header(Kind.END, call_id), b""]),
            lambda exc: self._reply_error(peer, call_id, exc),
            self._loop,
            functools.partial(self._done, key),
        )
        send_quiet(peer, [self._acks.answer_header(Kind.RESULT, peer, call_id, "stream"), b""])

    def _done(self, key: tuple[bytes, int]) -> None:
        if self._producers.pop(key, None) is not None:
            left = self._per_sender[key[0]] - 1
            if left > 0:
                self._per_sender[key[0]] = left
            else:
                del self._per_sender[key[0]]

    def on_flow(self, sender: bytes, kind: Kind, call_id: int, extra: list[object]) -> None:
        """CREDIT or CLOSE from a consumer."""
        producer = self._producers.get((sender, call_id))
        if producer is None:
            return
        if kind is Kind.CLOSE:
            producer.close()
        elif extra and type(extra[0]) is int and 0 < extra[0] <= 1 << 20:
            producer.grant(extra[0])

    # -- consuming -------------------------------------------------------------------------

    def open(self, sender: bytes, call_id: int) -> RemoteStream:
        """The consumer's side of the stream that ``sender`` answered call ``call_id`` with."""
        stream = RemoteStream(
            functools.partial(self._send_kind, sender, call_id, Kind.CREDIT),
            functools.partial(self._close_soon, sender, call_id),
            self._loop,
        )
        self._consumed[(sender, call_id)] = stream
        return stream

    def on_item(self, sender: bytes, kind: Kind, call_id: int, body: bytes, buffers: list[bytes]) -> None:
        """ITEM or END of a stream we consume."""
        stream = self._consumed.get((sender, call_id))
        if stream is None:
            return  # the consumer dropped it; CLOSE is on its way
        if kind is Kind.END:
            stream.end()
            return
        if not stream.may_push():
            self._cut(sender, call_id, stream, f"{sender.decode()!r} sent stream items past the window it was granted")
            return
        try:
            stream.push(self._values.decode(body, buffers, sender))
        except DecodeError as exc:
            self._cut(sender, call_id, stream, f"undecodable stream item from {sender.decode()!r}: {exc}")

    def _cut(self, sender: bytes, call_id: int, stream: RemoteStream, why: str) -> None:
        """End a stream whose producer broke the protocol; what it sends after is dropped unread."""
        del self._consumed[(sender, call_id)]
        stream.end(ProtocolError(why))
        self._send_kind(sender, call_id, Kind.CLOSE)

    def on_error(self, sender: bytes, call_id: int, error: Callable[[], BaseException]) -> bool:
        """An ERROR that ends a stream we consume (its generator raised); False if it is not one."""
        stream = self._consumed.get((sender, call_id))
        if stream is None:
            return False
        stream.end(error())
        return True

    def fail_peer(self, peer: bytes, exc: BaseException) -> None:
        """``peer`` is gone: its streams end with ``exc``, ours for it close."""
        for (owner, _), stream in list(self._consumed.items()):
            if owner == peer:
                stream.end(exc)
        for (owner, _), producer in list(self._producers.items()):
            if owner == peer:
                producer.close()

    async def aclose(self) -> None:
        """Close every producer and wait for their generators to finish."""
        producers = list(self._producers.values())
        for producer in producers:
            producer.close()
        if producers:
            await asyncio.gather(*(p.task for p in producers), return_exceptions=True)

    def _send_kind(self, peer: bytes, call_id: int, kind: Kind, *extra: object) -> None:
        self._send_quiet(peer, [pack_header(kind, call_id, *extra), b""])

    def _close_soon(self, peer: bytes, call_id: int) -> None:
        try:  # a finalizer: any thread
            self._loop.call_soon_threadsafe(self._send_kind, peer, call_id, Kind.CLOSE)
        except RuntimeError:
            pass
