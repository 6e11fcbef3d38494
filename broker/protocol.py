"""The wire protocol: frame layout, message kinds and PROTOCOL_VERSION, defined here only.

Frames of one message, as a worker's DEALER sends them::

    [destination, header, body, *buffers]

and as the broker's ROUTER delivers them to the destination::

    [sender, header, body, *buffers]

``destination`` and ``sender`` are actor names (UTF-8). The broker reads nothing but the
routing frame: it swaps the destination for the true sender's name and forwards the other
frames untouched. ``header`` is a small msgpack array ``[kind, call_id, *extra]``; ``body`` is
the msgpack payload (see ``pyisolate._codec``); ``buffers`` carry large binary values raw.

Messages addressed to the broker itself use the empty name ``b""`` (HELLO), and the broker
answers as ``b""`` (WELCOME, REFUSED, UNROUTABLE).
"""

from __future__ import annotations

import enum
from typing import Final

import msgpack

__all__ = [
    "BROKER",
    "HOST",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Kind",
    "pack_header",
    "unpack_header",
]

#: Bumped on any incompatible change to frames, kinds or header fields.
PROTOCOL_VERSION: Final = 2

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
    WELCOME      protocol_version                            empty
    REFUSED      reason (str)                                empty
    READY        (none)                                      {methods: [str, ...]}
    LOAD_FAILED  (none)                                      encoded exception
    CALL         method, ref_id, chain_owner, chain_id[, acks] [args, kwargs]
    RESULT       (none), or mode ("" or "stream") and acks   encoded value; nothing for a stream
    ERROR        (none), or "" and acks                      encoded exception
    UNROUTABLE   destination (str), reason (str)             the original header, verbatim
    STOP         (none)                                      empty; answered with RESULT
    RELEASE      ref_id, count                               empty
    ITEM         (none); call_id is the stream's             encoded item
    END          (none); call_id is the stream's             empty
    CREDIT       count; call_id is the stream's              empty
    CLOSE        (none); call_id is the stream's             empty
    EVENT        name (str)                                  encoded value
    ACK          [segment names]                             empty; shared memory received
    CANCEL       (none); call_id is the call's               empty; the caller gave up
    HEARTBEAT    (none)                                      empty; echoed back
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


_KIND_OF: Final = {int(k): k for k in Kind}
_packb = msgpack.Packer(use_bin_type=True).pack


def pack_header(kind: Kind, call_id: int = 0, *extra: object) -> bytes:
    """Pack a header frame."""
    header: bytes = _packb((int(kind), call_id, *extra))
    return header


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
