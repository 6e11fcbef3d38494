"""Delivery to one worker at the pace it reads: a credit window, then a bounded backlog.

The broker sends a worker only as much as the worker's *window* allows: messages and bytes
that the worker has not yet reported as read (the worker sends CONSUMED with its running
totals as it reads). Past the window, messages wait here, one FIFO per sender, and leave
round robin as credit comes back, so a sender with many messages queued cannot starve one
with few. Every queue is bounded:

- per sender and destination, at most ``per_sender`` messages (honest senders stay far below:
  their calls are capped by ``max_in_flight`` and everything else answers or steers those);
- all outboxes together hold at most ``Budget.limit`` bytes; past it, new work (CALL, STOP,
  EVENT) is refused, and so is any message whose sender holds the most bytes for that
  destination (the flooder), while the others' answers still pass.

Pure logic: sending is a callable handed in, so this module is tested without sockets.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .protocol import REQUESTS, kind_of_header

__all__ = ["REPORT_BYTES", "REPORT_MESSAGES", "WINDOW_BYTES", "WINDOW_MESSAGES", "Budget", "Outbox", "nbytes"]

#: Messages a worker may have unread before the broker holds the rest back.
WINDOW_MESSAGES = 1000
#: Bytes a worker may have unread before the broker holds the rest back (a larger message
#: still goes when less than REPORT_BYTES are unread).
WINDOW_BYTES = 64 * 1024 * 1024
#: A worker reports what it has read once this much is unreported, so the broker can count on
#: a report whenever at least this much is unread.
REPORT_MESSAGES = WINDOW_MESSAGES // 4
REPORT_BYTES = WINDOW_BYTES // 4

#: Sends ``[routing id, sender, header, body, *buffers]``; raises zmq.Again when the pipe is full.
Send = Callable[[list[Any]], None]


def nbytes(frames: Sequence[Any]) -> int:
    """Bytes in ``frames`` (bytes, memoryviews or zmq frames)."""
    total = 0
    for frame in frames:
        total += len(frame) if type(frame) is bytes else memoryview(frame).nbytes
    return total


class Budget:
    """Bytes held back by all outboxes of one broker, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Outbox:
    """What the broker has for one worker: the window in flight and the backlog beyond it."""

    def __init__(self, name: bytes, rid: bytes, send: Send, budget: Budget, per_sender: int) -> None:
        self.name = name
        self.rid = rid
        self._send = send
        self._budget = budget
        self._per_sender = per_sender
        self.sent_messages = self.sent_bytes = 0
        self.read_messages = self.read_bytes = 0
        self._queues: dict[bytes, collections.deque[tuple[list[Any], int]]] = {}
        self._bytes_by: dict[bytes, int] = {}
        self._turn: collections.deque[bytes] = collections.deque()  # senders with a queue, in turn
        self._urgent: collections.deque[tuple[list[Any], int]] = collections.deque()
        self.queued = 0
        self.queued_bytes = 0
        self.blocked = False  # the socket said Again: wait for credit or a writable socket

    # -- sending ---------------------------------------------------------------------------

    def offer(self, sender: bytes, frames: list[Any], size: int) -> str | None:
        """Send ``frames`` (routing id first) now, or queue them; return why not, if refused."""
        if not self.queued and self._fits(size) and self._send_now(frames, size):
            return None
        refusal = self._refusal(sender, frames[2], size)
        if refusal is not None:
            return refusal
        queue = self._queues.get(sender)
        if queue is None:
            queue = self._queues[sender] = collections.deque()
            self._turn.append(sender)
        queue.append((frames, size))
        self._bytes_by[sender] = self._bytes_by.get(sender, 0) + size
        self._hold(size)
        return None

    def urgent(self, frames: list[Any]) -> None:
        """Send a small control message (heartbeat, broker notice) ahead of the backlog."""
        size = nbytes(frames[1:])
        if not self._urgent and not self.blocked and self._send_now(frames, size):
            return
        self._urgent.append((frames, size))
        self._hold(size)

    def credit(self, messages: object, size: object) -> None:
        """The worker reports having read ``messages`` messages and ``size`` bytes in all."""
        if type(messages) is not int or type(size) is not int:
            return
        # Totals only grow, and never past what was sent: a lying worker gains nothing.
        self.read_messages = max(self.read_messages, min(messages, self.sent_messages))
        self.read_bytes = max(self.read_bytes, min(size, self.sent_bytes))
        self.blocked = False
        self.flush()

    def flush(self) -> None:
        """Send queued messages, urgent ones first, then one sender at a time, while credit lasts."""
        while self._urgent and not self.blocked:
            frames, size = self._urgent[0]
            if not self._try(frames, size):
                return
            self._urgent.popleft()
        turn = self._turn
        while turn and not self.blocked:
            sender = turn[0]
            queue = self._queues[sender]
            frames, size = queue[0]
            if not self._fits(size) or not self._try(frames, size):
                return
            queue.popleft()
            self._bytes_by[sender] -= size
            turn.popleft()
            if queue:
                turn.append(sender)  # its next message waits for the others' turn
            else:
                del self._queues[sender], self._bytes_by[sender]

    def close(self) -> None:
        """The worker is gone: drop what waits for it."""
        self._budget.used -= self.queued_bytes
        self._queues.clear()
        self._bytes_by.clear()
        self._turn.clear()
        self._urgent.clear()
        self.queued = self.queued_bytes = 0

    # -- internals -------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        unread = self.sent_bytes - self.read_bytes
        return (not self.blocked and self.sent_messages - self.read_messages < WINDOW_MESSAGES
                and (unread + size <= WINDOW_BYTES or unread < REPORT_BYTES))

    def _send_now(self, frames: list[Any], size: int) -> bool:
        """Send at once; False (and blocked) when the socket's pipe is full."""
        try:
            self._send(frames)
        except zmq.Again:
            self.blocked = True
            return False
        self.sent_messages += 1
        self.sent_bytes += size
        return True

    def _try(self, frames: list[Any], size: int) -> bool:
        """Send a queued message and take it off the books."""
        if not self._send_now(frames, size):
            return False
        self.queued -= 1
        self.queued_bytes -= size
        self._budget.used -= size
        return True

    def _hold(self, size: int) -> None:
        self.queued += 1
        self.queued_bytes += size
        self._budget.used += size

    def _refusal(self, sender: bytes, header: Any, size: int) -> str | None:
        who, whom = sender.decode(errors="replace") or "the broker", self.name.decode(errors="replace")
        queue = self._queues.get(sender)
        if queue is not None and len(queue) >= self._per_sender:
            return (f"the queue for actor {whom!r} is full: it already holds {len(queue)} messages from "
                    f"{who!r} (the most one sender may queue for one actor)")
        budget = self._budget
        if budget.used + size <= budget.limit or not self.queued:
            return None
        held = self._bytes_by.get(sender, 0)
        largest = held > 0 and held >= max(self._bytes_by.values())
        if kind_of_header(bytes(header[:2])) in REQUESTS or largest:
            return (f"the broker's queues are full: {budget.used} bytes wait for actors that are not "
                    f"keeping up (max_queued_bytes={budget.limit}); {whom!r} has {self.queued_bytes} bytes "
                    f"queued, {held} of them from {who!r}")
        return None
