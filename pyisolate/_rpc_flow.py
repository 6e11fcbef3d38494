"""Flow control of an Endpoint: calls in flight per target, acknowledgements of shared memory.

Backpressure: at most ``max_in_flight`` calls per target await answers (below the socket's
high-water mark); callers beyond the cap wait in a first-come queue, so nothing is queued
without bound or dropped.

Acknowledgements: a receiver that maps a shared-memory segment tells the sender, which then
unpins it (see ``_shm``). They ride in headers where they can: the answer to a CALL
acknowledges what the CALL carried, and segments received in answers, events or stream items
are acknowledged by the next CALL to their sender, or else by an ACK message at the end of the
loop's turn. Headers stay small: more than ``ACKS_PER_HEADER`` names go in ACK messages.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from pyisolate.broker.protocol import Kind, pack_header

__all__ = ["ACKS_PER_HEADER", "FlowEndpoint"]

#: Segment names per header: MAX_HEADER_BYTES holds this many with room to spare.
ACKS_PER_HEADER = 64


class FlowEndpoint:
    """Mixed into Endpoint, which initialises this state and provides the sending."""

    loop: asyncio.AbstractEventLoop
    max_in_flight: int
    _in_flight: dict[bytes, int]
    _slot_waiters: dict[bytes, collections.deque[asyncio.Future[None]]]
    _call_acks: dict[tuple[bytes, int], list[str]]  # segments a CALL carried, acked by its answer
    _owed_acks: dict[bytes, list[str]]  # segments received outside CALLs, per sender

    if TYPE_CHECKING:
        def _send_quiet(self, dest: bytes, frames: list[Any]) -> None: ...

    # -- calls in flight ---------------------------------------------------------------------

    async def _wait_for_slot(self, target: bytes) -> None:
        """Wait (first come, first served) until fewer than max_in_flight calls to target are open."""
        waiters = self._slot_waiters.setdefault(target, collections.deque())
        while self._in_flight.get(target, 0) >= self.max_in_flight:
            waiter = self.loop.create_future()
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken and cancelled: wake the next one
                    _wake_next(waiters)
                raise

    def _free_slot(self, target: bytes) -> None:
        self._in_flight[target] -= 1
        waiters = self._slot_waiters.get(target)
        if waiters:
            _wake_next(waiters)

    # -- acknowledgements --------------------------------------------------------------------

    def _call_header(self, target: bytes, call_id: int, method: str, ref_id: int, chain: tuple[str, int]) -> bytes:
        """A CALL's header, carrying what we owe ``target`` when it fits."""
        owed = self._owed_acks.pop(target, None)
        if owed is not None and len(owed) <= ACKS_PER_HEADER:
            return pack_header(Kind.CALL, call_id, method, ref_id, chain[0], chain[1], owed)
        if owed:
            self._send_acks(target, owed)
        return pack_header(Kind.CALL, call_id, method, ref_id, chain[0], chain[1])

    def _answer_header(self, kind: Kind, sender: bytes, call_id: int, mode: str = "") -> bytes:
        """The header of a CALL's answer, carrying the acknowledgement of what the CALL shared."""
        acks = self._call_acks.pop((sender, call_id), None)
        if acks is not None and len(acks) <= ACKS_PER_HEADER:
            return pack_header(kind, call_id, mode, acks)
        if acks:
            self._send_acks(sender, acks)
        return pack_header(kind, call_id, mode) if mode else pack_header(kind, call_id)

    def _owe_acks(self, peer: bytes, names: list[str]) -> None:
        """Acknowledge segments received outside a CALL: with our next CALL to ``peer`` if it
        leaves in this turn of the loop (a caller awaiting an answer usually calls again), else
        with an ACK message of their own at the end of the turn."""
        owed = self._owed_acks.get(peer)
        if owed is None:
            self._owed_acks[peer] = list(names)
            # Two hops: an answer's future wakes its awaiting task in the next turn, and that
            # task's next call must get the chance to carry these first.
            self.loop.call_soon(self.loop.call_soon, self._flush_acks, peer)
        else:
            owed.extend(names)

    def _flush_acks(self, peer: bytes) -> None:
        names = self._owed_acks.pop(peer, None)
        if names:
            self._send_acks(peer, names)

    def _send_acks(self, dest: bytes, names: list[str]) -> None:
        for i in range(0, len(names), ACKS_PER_HEADER):
            self._send_quiet(dest, [pack_header(Kind.ACK, 0, names[i:i + ACKS_PER_HEADER]), b""])


def _wake_next(waiters: collections.deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return
