"""The stream half of an Endpoint: producing for remote consumers, consuming remote streams."""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import TYPE_CHECKING, Any

from pyisolate.broker.protocol import Kind, pack_header

from ._codec import DecodeError
from ._streams import Producer, RemoteStream
from .errors import ProtocolError

__all__ = ["StreamEndpoint"]


class StreamEndpoint:
    """Mixed into Endpoint: it provides the encoding, sending and state used here."""

    loop: asyncio.AbstractEventLoop
    _producers: dict[tuple[bytes, int], Producer]
    _streams: weakref.WeakValueDictionary[tuple[bytes, int], RemoteStream]

    if TYPE_CHECKING:
        def _encode(self, dest: bytes, value: object, loop: asyncio.AbstractEventLoop | None
                    ) -> tuple[bytes, list[Any]]: ...
        def _decode(self, body: bytes, buffers: list[bytes], sender: bytes) -> object: ...
        def _send_quiet(self, dest: bytes, frames: list[Any]) -> None: ...
        def _reply_error(self, sender: bytes, call_id: int, exc: BaseException) -> None: ...
        def _answer_header(self, kind: Kind, sender: bytes, call_id: int, mode: str = "") -> bytes: ...


    def _start_stream(self, peer: bytes, call_id: int, agen: Any) -> None:
        key = (peer, call_id)
        header_item = pack_header(Kind.ITEM, call_id)

        def send_item(item: object) -> None:
            body, buffers = self._encode(peer, item, None)
            self._send_quiet(peer, [header_item, body, *buffers])

        self._producers[key] = Producer(
            agen,
            send_item,
            lambda: self._send_quiet(peer, [pack_header(Kind.END, call_id), b""]),
            lambda exc: self._reply_error(peer, call_id, exc),
            self.loop,
            functools.partial(self._producers.pop, key, None),  # type: ignore[arg-type]
        )
        self._send_quiet(peer, [self._answer_header(Kind.RESULT, peer, call_id, "stream"), b""])

    def _on_item(self, sender: bytes, kind: Kind, call_id: int, body: bytes, buffers: list[bytes]) -> None:
        stream = self._streams.get((sender, call_id))
        if stream is None:
            return  # the consumer dropped it; CLOSE is on its way
        if kind is Kind.END:
            stream.end()
            return
        try:
            stream.push(self._decode(body, buffers, sender))
        except DecodeError as exc:
            stream.end(ProtocolError(f"undecodable stream item from {sender.decode()!r}: {exc}"))
            self._send_flow_kind(sender, call_id, Kind.CLOSE)

    def _on_flow(self, sender: bytes, kind: Kind, call_id: int, extra: list[object]) -> None:
        producer = self._producers.get((sender, call_id))
        if producer is None:
            return
        if kind is Kind.CLOSE:
            producer.close()
        elif extra and type(extra[0]) is int and 0 < extra[0] <= 1 << 20:
            producer.grant(extra[0])

    def _send_flow(self, peer: bytes, call_id: int, count: int) -> None:
        self._send_quiet(peer, [pack_header(Kind.CREDIT, call_id, count), b""])

    def _send_flow_kind(self, peer: bytes, call_id: int, kind: Kind) -> None:
        self._send_quiet(peer, [pack_header(kind, call_id), b""])

    def _close_soon(self, peer: bytes, call_id: int) -> None:
        try:  # a finalizer: any thread
            self.loop.call_soon_threadsafe(self._send_flow_kind, peer, call_id, Kind.CLOSE)
        except RuntimeError:
            pass
