"""The broker's delivery to one worker: window, backlog, fairness, bounds (pure logic, no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from pyisolate.broker.delivery import REPORT_BYTES, WINDOW_BYTES, WINDOW_MESSAGES, Budget, Outbox, nbytes
from pyisolate.broker.protocol import Kind, pack_header, unpack_header


class Pipe:
    """Stands in for the socket: records what was sent; can be made to say Again."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []
        self.full = False

    def __call__(self, frames: list[Any]) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append(frames)


def message(sender: bytes, kind: Kind = Kind.CALL, body: bytes = b"", n: int = 0) -> list[Any]:
    return [b"rid", sender, pack_header(kind, n), body]


def offer(box: Outbox, sender: bytes, kind: Kind = Kind.CALL, body: bytes = b"", n: int = 0) -> str | None:
    frames = message(sender, kind, body, n)
    return box.offer(sender, frames, nbytes(frames[1:]))


def outbox(pipe: Pipe, budget: int = 1 << 30, per_sender: int = 10_000) -> Outbox:
    return Outbox(b"w", b"rid", pipe, Budget(budget), per_sender)


def test_the_window_holds_back_what_the_worker_has_not_read_and_credit_releases_it():
    pipe = Pipe()
    box = outbox(pipe)
    for i in range(WINDOW_MESSAGES + 10):
        assert offer(box, b"a", n=i) is None
    assert len(pipe.sent) == WINDOW_MESSAGES and box.queued == 10
    box.credit(WINDOW_MESSAGES, box.sent_bytes)  # the worker read everything so far
    assert len(pipe.sent) == WINDOW_MESSAGES + 10 and box.queued == 0
    assert [unpack_header(f[2])[1] for f in pipe.sent] == list(range(WINDOW_MESSAGES + 10))  # in order


def test_order_is_kept_per_sender_and_senders_take_turns():
    pipe = Pipe()
    box = outbox(pipe)
    for i in range(WINDOW_MESSAGES):
        offer(box, b"filler", n=i)
    for i in range(5):
        offer(box, b"flood", n=i)
    offer(box, b"quiet", n=100)
    box.credit(WINDOW_MESSAGES, box.sent_bytes)
    order = [f[1] for f in pipe.sent[WINDOW_MESSAGES:]]
    assert order == [b"flood", b"quiet", b"flood", b"flood", b"flood", b"flood"]  # quiet waits one turn, not five


def test_a_lying_worker_cannot_claim_more_than_was_sent():
    pipe = Pipe()
    box = outbox(pipe)
    offer(box, b"a")
    box.credit(10**9, 10**12)
    assert box.read_messages == 1 and box.read_bytes == box.sent_bytes
    box.credit(0, 0)  # totals never go back
    assert box.read_messages == 1
    box.credit("x", None)  # malformed: ignored
    assert box.read_messages == 1


def test_bytes_count_too_and_one_large_message_still_goes():
    pipe = Pipe()
    box = outbox(pipe)
    big = bytes(WINDOW_BYTES)  # bigger than the window on its own
    assert offer(box, b"a", body=big) is None
    assert len(pipe.sent) == 1  # nothing was unread: it goes
    assert offer(box, b"a", body=b"small") is None
    assert len(pipe.sent) == 1 and box.queued == 1  # now the window is full
    box.credit(1, box.sent_bytes)
    assert len(pipe.sent) == 2
    # Less than REPORT_BYTES unread: the worker might never report, so a large one still goes.
    assert offer(box, b"a", body=bytes(WINDOW_BYTES - REPORT_BYTES + 100)) is None
    assert len(pipe.sent) == 3


def test_a_sender_past_its_share_is_refused_the_others_are_not():
    pipe = Pipe()
    box = outbox(pipe, per_sender=3)
    for i in range(WINDOW_MESSAGES):
        offer(box, b"filler", n=i)
    for _ in range(3):
        assert offer(box, b"flood") is None
    refusal = offer(box, b"flood")
    assert refusal is not None and "3 messages from 'flood'" in refusal and "'w'" in refusal
    assert offer(box, b"quiet") is None


def test_past_the_budget_new_work_and_the_largest_holder_are_refused():
    pipe = Pipe()
    box = outbox(pipe, budget=1000)
    for i in range(WINDOW_MESSAGES):
        offer(box, b"filler", n=i)
    assert offer(box, b"big", Kind.RESULT, body=bytes(900)) is None  # the first held message always fits
    refusal = offer(box, b"small", Kind.CALL, body=bytes(200))
    assert refusal is not None and "max_queued_bytes=1000" in refusal
    assert offer(box, b"small", Kind.RESULT, body=bytes(200)) is None  # answers of others still pass
    assert offer(box, b"big", Kind.RESULT, body=bytes(10)) is not None  # the largest holder does not
    box.close()
    assert box.queued == 0


def test_urgent_messages_skip_the_backlog_and_again_blocks_until_credit():
    pipe = Pipe()
    box = outbox(pipe)
    for i in range(WINDOW_MESSAGES + 1):
        offer(box, b"a", n=i)
    box.urgent([b"rid", b"host", pack_header(Kind.HEARTBEAT, 0), b""])
    assert pipe.sent[-1][1] == b"host"  # past the full window, ahead of the one held
    pipe.full = True
    box.credit(WINDOW_MESSAGES, box.sent_bytes)
    assert box.blocked and box.queued == 1
    pipe.full = False
    box.credit(WINDOW_MESSAGES, box.sent_bytes)
    assert not box.blocked and box.queued == 0


@pytest.mark.parametrize("frames", [[b"ab", memoryview(b"cde"), bytearray(b"f")]])
def test_nbytes_counts_every_kind_of_frame(frames):
    assert nbytes(frames) == 6
