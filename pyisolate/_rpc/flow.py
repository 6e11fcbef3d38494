"""Flow control of one actor: call slots per target, and acknowledgements of shared memory.

Slots: at most ``limit`` calls to one target are open at once. A call holds its slot from
the moment it is sent until its answer arrives or the target is gone, even when the caller
stopped waiting (timeout, cancellation): the work is still running over there. Callers past
the cap wait first come, first served. The serving side refuses a sender that goes past the
same cap (see ``serve``), so honest callers never meet that refusal.

Acknowledgements: a receiver whose last view of a shared-memory segment died releases it to
the sender, which then unpins it (see ``pyisolate._wire.shm``). They ride in headers where
they can: the next CALL to their sender or answer to it carries them, or else an ACK message
at the end of the loop's turn. Headers stay small: more than ``ACKS_PER_HEADER`` names go in
ACK messages.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from pyisolate.broker.protocol import Kind, pack_header

__all__ = ["ACKS_PER_HEADER", "Acks", "Slots"]

#: Segment names per header: MAX_HEADER_BYTES holds this many with room to spare.
ACKS_PER_HEADER = 64

#: Sends ``[header, body, *buffers]`` to an actor, never raising for a departed one.
SendQuiet = Callable[[bytes, list[Any]], None]


class Slots:
    """Open calls per target, at most ``limit`` each; the rest wait in line for a freed slot.

    A freed slot is handed straight to the first in line, so nobody overtakes a waiter.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self.limit = limit
        self._open: dict[bytes, int] = {}
        self._waiters: dict[bytes, collections.deque[asyncio.Future[None]]] = {}

    def take(self, target: bytes) -> bool:
        """Open a call to ``target`` if a slot is free; False: ``await wait(target)`` instead."""
        n = self._open.get(target, 0)
        if n >= self.limit:
            return False
        self._open[target] = n + 1
        return True

    def force(self, target: bytes) -> bool:
        """Open a call to ``target`` past the cap (a control request that must not queue)."""
        self._open[target] = self._open.get(target, 0) + 1
        return True

    async def wait(self, target: bytes) -> None:
        """Wait in line for a slot to ``target``; on return the call holds it."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(target, collections.deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(target)  # handed a slot, but leaving: pass it on
            else:
                waiters = self._waiters.get(target)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
            raise

    def release(self, target: bytes) -> None:
        """A call to ``target`` ended (answered, or its target is gone): hand its slot on."""
        waiters = self._waiters.get(target)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: the count stays
                return
        if waiters is not None:
            del self._waiters[target]
        left = self._open.get(target, 0) - 1
        if left > 0:
            self._open[target] = left
        else:
            self._open.pop(target, None)

    def open(self, target: bytes) -> int:
        """Calls to ``target`` open now."""
        return self._open.get(target, 0)

    def waiting(self, target: bytes) -> int:
        """Callers waiting in line for a slot to ``target`` now."""
        waiters = self._waiters.get(target)
        return len(waiters) if waiters is not None else 0


class Acks:
    """Acknowledgements owed to peers for shared-memory segments they sent us."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send_quiet: SendQuiet) -> None:
        self._loop = loop
        self._send_quiet = send_quiet
        self.owed: dict[bytes, list[str]] = {}  # released, not yet told: per sender

    def call_header(self, target: bytes, call_id: int, method: str, ref_id: int, chain: tuple[str, int],
                    trace: object = None) -> bytes:
        """A CALL's header, carrying what we owe ``target`` when it fits, and the trace context
        ``trace`` (a field of ``tracing.wire_field``) when the call is traced; without one the
        header is what it would be with tracing off."""
        owed = self.owed.pop(target, None)
        if owed is not None and len(owed) > ACKS_PER_HEADER:
            self.send(target, owed)
            owed = None
        if trace is not None:
            return pack_header(Kind.CALL, call_id, method, ref_id, chain[0], chain[1], owed, trace)
        if owed is not None:
            return pack_header(Kind.CALL, call_id, method, ref_id, chain[0], chain[1], owed)
        return pack_header(Kind.CALL, call_id, method, ref_id, chain[0], chain[1])

    def answer_header(self, kind: Kind, sender: bytes, call_id: int, mode: str = "") -> bytes:
        """The header of a CALL's answer, carrying what we owe ``sender`` when it fits."""
        acks = self.owed.pop(sender, None)
        if acks is not None and len(acks) <= ACKS_PER_HEADER:
            return pack_header(kind, call_id, mode, acks)
        if acks:
            self.send(sender, acks)
        return pack_header(kind, call_id, mode) if mode else pack_header(kind, call_id)

    def owe(self, peer: bytes, names: list[str]) -> None:
        """Release segments ``peer`` sent us: with our next CALL to ``peer`` or answer to it if
        it leaves in this turn of the loop (a caller awaiting an answer usually calls again),
        else with an ACK message of their own at the end of the turn."""
        owed = self.owed.get(peer)
        if owed is None:
            self.owed[peer] = list(names)
            # Two hops: an answer's future wakes its awaiting task in the next turn, and that
            # task's next call must get the chance to carry these first.
            self._loop.call_soon(self._loop.call_soon, self._flush, peer)
        else:
            owed.extend(names)

    def drop_peer(self, peer: bytes) -> None:
        """``peer`` is gone: nothing is owed to it any more."""
        self.owed.pop(peer, None)

    def _flush(self, peer: bytes) -> None:
        names = self.owed.pop(peer, None)
        if names:
            self.send(peer, names)

    def send(self, dest: bytes, names: list[str]) -> None:
        """Send ACK messages for ``names`` to ``dest``."""
        for i in range(0, len(names), ACKS_PER_HEADER):
            self._send_quiet(dest, [pack_header(Kind.ACK, 0, names[i:i + ACKS_PER_HEADER]), b""])
