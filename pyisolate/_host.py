"""The host's own actor on the broker: it makes calls and matches their answers.

Lives on the broker's event loop. A call costs one send on the ROUTER and one callback
when the answer arrives; no thread hand-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pyisolate.broker.protocol import HOST, Kind, pack_header, unpack_header
from pyisolate.broker.router import Broker

from ._codec import DecodeError, decode, decode_exception, encode
from .errors import ProtocolError, UnroutableError

__all__ = ["HostEndpoint"]

logger = logging.getLogger("pyisolate")

#: Receives READY and LOAD_FAILED: (sender, kind, body, buffers).
ControlHandler = Callable[[bytes, Kind, bytes, list[bytes]], None]


class HostEndpoint:
    """Pending calls of the host, by call id, and the dispatch of their answers."""

    def __init__(self, broker: Broker, on_control: ControlHandler) -> None:
        self._broker = broker
        self._on_control = on_control
        self._pending: dict[int, tuple[asyncio.Future[Any], bytes]] = {}
        self._next_id = 0
        self.dropped = 0
        broker.add_local(HOST, self._on_frames)

    async def call(self, target: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``method`` on actor ``target`` and return its result (or raise its error)."""
        body, buffers = encode([list(args), kwargs])
        return await self._request(target, Kind.CALL, body, buffers, method)

    async def stop(self, target: bytes) -> None:
        """Ask actor ``target`` to run its stop hook and exit."""
        await self._request(target, Kind.STOP, b"", [])

    async def _request(self, target: bytes, kind: Kind, body: bytes, buffers: list[Any], *extra: object) -> Any:
        self._next_id += 1
        call_id = self._next_id
        header = pack_header(kind, call_id, *extra)
        future: asyncio.Future[Any] = self._broker.loop.create_future()
        self._pending[call_id] = (future, target)
        try:
            try:
                self._broker.send(target, HOST, [header, body, *buffers])
            except LookupError as exc:
                raise UnroutableError(f"no actor named {target.decode()!r} is connected") from exc
            return await future
        finally:
            self._pending.pop(call_id, None)

    def fail(self, target: bytes, exc: BaseException) -> None:
        """Fail every pending call to ``target`` with ``exc``."""
        for future, to in list(self._pending.values()):
            if to == target and not future.done():
                future.set_exception(exc)

    def _on_frames(self, sender: bytes, frames: list[bytes]) -> None:
        try:
            kind, call_id, extra = unpack_header(frames[0])
        except ValueError as exc:
            self._drop(sender, str(exc))
            return
        match kind:
            case Kind.RESULT | Kind.ERROR:
                self._on_answer(sender, kind, call_id, frames[1], frames[2:])
            case Kind.READY | Kind.LOAD_FAILED:
                self._on_control(sender, kind, frames[1], frames[2:])
            case Kind.UNROUTABLE:
                self._on_unroutable(extra, frames[1])
            case _:
                self._drop(sender, f"unexpected {kind.name}")

    def _on_answer(self, sender: bytes, kind: Kind, call_id: int, body: bytes, buffers: list[bytes]) -> None:
        entry = self._pending.get(call_id)
        if entry is None or entry[1] != sender:  # late, or an actor answering another's call
            self._drop(sender, f"answer to unknown call {call_id}")
            return
        future = entry[0]
        if future.done():
            return
        try:
            if kind is Kind.RESULT:
                future.set_result(decode(body, buffers))
            else:
                future.set_exception(decode_exception(body, buffers))
        except DecodeError as exc:
            future.set_exception(ProtocolError(f"undecodable answer from {sender.decode()!r}: {exc}"))

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
