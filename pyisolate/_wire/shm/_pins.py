"""Pins: the leases a sender holds for its receivers until each releases what it was sent.

One pin per (receiver, token), counted per send; a release (ACK) ends one count. Pins are kept
per receiver, and the broker stamps who releases, so no peer can end another's. A release
marked ``!`` (the receiver shared the segment on with a third actor) taints the segment: its
pool never reuses it; so does the receiver going away (it may have shared it on first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

__all__ = ["TAINT", "Segment", "drop", "holds", "pin", "pinned", "unpin"]

#: Marks a release whose segment the receiver shared on: never to be reused.
TAINT = "!"


class _Taintable(Protocol):
    tainted: bool


class Segment(Protocol):
    """What a pin holds: a lease (``_segments.Segment``), and its mapping to taint."""

    @property
    def mapping(self) -> _Taintable: ...


@dataclass(eq=False)
class _Pin:
    segment: Segment
    count: int = 0


# Never held while a lease can end (its finalizer takes the segments' lock): released pins
# are dropped after it.
_lock = threading.RLock()
_pins: dict[bytes, dict[str, _Pin]] = {}  # peer -> token -> pin


def pin(peer: bytes, segment: Segment, key: str) -> None:
    """Keep ``segment`` leased until ``peer`` releases ``key`` (or goes away)."""
    with _lock:
        _pins.setdefault(peer, {}).setdefault(key, _Pin(segment)).count += 1


def holds(peer: bytes, key: str) -> bool:
    """Whether ``peer`` holds ``key``: sent to it, and not released."""
    with _lock:
        return key in _pins.get(peer, {})


def unpin(peer: bytes, keys: list[object]) -> None:
    """``peer`` released these segments (once per send); ``!`` before a key: it shared it on."""
    released: list[_Pin] = []
    with _lock:
        pins = _pins.get(peer)
        if not pins:
            return
        for key in keys:
            if not isinstance(key, str):
                continue
            tainted = key.startswith(TAINT)
            if (entry := pins.get(key[1:] if tainted else key)) is not None:
                if tainted:
                    entry.segment.mapping.tainted = True
                entry.count -= 1
                if entry.count <= 0:
                    released.append(pins.pop(key[1:] if tainted else key))
    del released


def drop(peer: bytes) -> None:
    """``peer`` is gone: nothing stays pinned for it, and what it held is never reused."""
    with _lock:
        released = _pins.pop(peer, None)
        for entry in (released or {}).values():
            entry.segment.mapping.tainted = True
    del released


def pinned() -> int:
    """How many segments are pinned for receivers (for tests and diagnostics)."""
    with _lock:
        return sum(len(p) for p in _pins.values())
