"""The wire protocol: frame layout, message kinds and PROTOCOL_VERSION, defined here only.

Frames of one message, as a worker's DEALER sends them::

    [destination, header, body, *buffers]

and as the broker's ROUTER delivers them to the destination::

    [sender, header, body, *buffers]

``destination`` and ``sender`` are actor names (UTF-8). The broker reads nothing but the
routing frame: it swaps the destination for the true sender's name and forwards the other
frames untouched. ``header`` is a small msgpack array ``[kind, call_id, *extra]``; ``body`` is
the msgpack payload (see ``pyisolate._wire.codec``); ``buffers`` carry large binary values raw.

Messages addressed to the broker itself use the empty name ``b""`` (HELLO, CONSUMED), and the
broker speaks as ``b""`` (WELCOME, REFUSED, UNROUTABLE, LOST, GONE). Those are *broker-only*
kinds: a receiver accepts them only with the sender ``b""``, which the broker never stamps on
an actor's message.
"""

from __future__ import annotations

import enum
from typing import Final

import msgpack

__all__ = [
    "BROKER",
    "BROKER_ONLY",
    "HOST",
    "MAX_HEADER_BYTES",
    "NO_ACTOR",
    "PROTOCOL_VERSION",
    "QUEUE_FULL",
    "REQUESTS",
    "TOO_LARGE",
    "UNDELIVERED_CODES",
    "Kind",
    "kind_of_header",
    "pack_header",
    "unpack_header",
]

#: Bumped on any incompatible change to frames, kinds or header fields.
PROTOCOL_VERSION: Final = 5

#: Routing name of the broker itself.
BROKER: Final = b""
#: Routing name of the host application (the manager's own calls).
HOST: Final = b"host"

#: Headers are a few ints and a short name; anything bigger is hostile or broken.
MAX_HEADER_BYTES: Final = 4096


class Kind(enum.IntEnum):
    """Message kinds. The header's first field.

    Header fields after ``[kind, call_id]`` per kind:

    ===========  ==========================================  ===============================
    kind         extra header fields                         body
    ===========  ==========================================  ===============================
    HELLO        protocol_version                            {name, secret, pid}
    WELCOME      protocol_version, moves {public: actor},    empty, or a remote worker's
                 apart [actor, ...]                          bootstrap
    REFUSED      reason (str)                                empty
    READY        (none)                                      {methods: [str, ...]}
    LOAD_FAILED  (none)                                      encoded exception
    CALL         method, ref_id, chain_owner, chain_id[,     [args, kwargs]
                 acks or nil[, trace context]]
    RESULT       (none), or mode ("" or "stream") and acks   encoded value; nothing for a stream
    ERROR        (none), or "" and acks                      encoded exception
    UNROUTABLE   destination (str), reason (str), code (str)  the original header, verbatim:
                                                             your message was not delivered;
                                                             code: UNDELIVERED_CODES
    STOP         (none)                                      empty; answered with RESULT
    RELEASE      ref_id, count (or none: a batch in the body)   empty, or [ref_id, count, ...]
    ITEM         (none); call_id is the stream's             encoded item
    END          (none); call_id is the stream's             empty
    CREDIT       count; call_id is the stream's              empty
    CLOSE        (none); call_id is the stream's             empty
    EVENT        name (str)                                  encoded value
    ACK          [segment names]                             empty; shared memory received
    CANCEL       (none); call_id is the call's               empty; the caller gave up
    HEARTBEAT    (none)                                      empty; echoed back
    CONSUMED     messages, bytes (totals since joining)      empty; to the broker: delivery credit
    LOST         answerer (str), reason (str)                the refused answer's header: the
                                                             answer to your call was not delivered
    GONE         actor (str)                                 encoded exception: why it left
    SPANS        (none)                                      finished trace spans, worker -> host
                                                             (see ``pyisolate._rpc.tracing``)
    MOVED        public name (str), actor (str)              empty; broker -> worker: calls by
                                                             the public name go to actor now
                                                             (actor == public: as named again);
                                                             worker -> broker: the same fields,
                                                             acknowledged
    APART        actor (str), apart (bool)                   empty; broker -> worker: values for
                                                             that actor travel as frames (it is
                                                             on another machine), or no longer
    ===========  ==========================================  ===============================
    """

    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    READY = 4
    LOAD_FAILED = 5
    CALL = 6
    RESULT = 7
    ERROR = 8
    UNROUTABLE = 9
    STOP = 10
    RELEASE = 11
    ITEM = 12
    END = 13
    CREDIT = 14
    CLOSE = 15
    EVENT = 16
    ACK = 17
    CANCEL = 18
    HEARTBEAT = 19
    CONSUMED = 20
    LOST = 21
    GONE = 22
    SPANS = 23
    MOVED = 24
    APART = 25


#: Why a message was not delivered (UNROUTABLE's third field): no such actor (or it left), a
#: bounded queue on the way is full, the message exceeds max_message_size.
NO_ACTOR: Final = "no_actor"
QUEUE_FULL: Final = "queue_full"
TOO_LARGE: Final = "too_large"
UNDELIVERED_CODES: Final = frozenset({NO_ACTOR, QUEUE_FULL, TOO_LARGE})

#: Kinds only the broker sends (with the sender ``b""``); from anyone else they are dropped.
BROKER_ONLY: Final = frozenset({Kind.WELCOME, Kind.REFUSED, Kind.UNROUTABLE, Kind.LOST, Kind.GONE, Kind.MOVED,
                                Kind.APART})
#: Kinds that ask for new work; the others answer or steer work already asked for.
REQUESTS: Final = frozenset({Kind.CALL, Kind.STOP, Kind.EVENT})


_KIND_OF: Final = {int(k): k for k in Kind}
_packb = msgpack.Packer(use_bin_type=True).pack


def pack_header(kind: Kind, call_id: int = 0, *extra: object) -> bytes:
    """Pack a header frame."""
    header: bytes = _packb((int(kind), call_id, *extra))
    return header


def kind_of_header(frame: bytes) -> int:
    """The kind of a header without decoding it (its second byte), or -1; for routing decisions.

    Every kind is a positive fixint right after the array header, so this is one index.
    """
    return frame[1] if len(frame) > 1 and 0x92 <= frame[0] <= 0x9F else -1


def unpack_header(frame: bytes) -> tuple[Kind, int, list[object]]:
    """Unpack and check a header frame from an untrusted peer.

    Raises:
        ValueError: the frame is not a well-formed header.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=True
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"header is not msgpack: {exc}") from exc
    if (
        not isinstance(fields, list)
        or len(fields) < 2
        or type(fields[0]) is not int
        or fields[0] not in _KIND_OF
        or type(fields[1]) is not int
    ):
        raise ValueError(f"malformed header: {fields!r:.200}")
    return _KIND_OF[fields[0]], fields[1], fields[2:]
