"""The application's types: values that travel by value, and a model that travels by reference."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
from typing import NamedTuple


class FolderType(enum.Enum):
    output = "output"
    temp = "temp"


class Level(enum.IntEnum):
    low = 1
    high = 2


@dataclasses.dataclass(frozen=True)
class SavedResult:
    filename: str
    subfolder: str
    type: FolderType
    data: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.filename, str):
            raise TypeError(f"filename must be a str, got {type(self.filename).__name__}")


class Point(NamedTuple):
    x: int
    y: int


class Device:
    """Like torch.device: not a dataclass, so it registers with encode= and decode=."""

    def __init__(self, spec: str) -> None:
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"not a device: {spec!r}")
        self.spec = spec

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class Unregistered:
    """Never registered: sending one must fail, saying how to register it."""


class Model:
    """Kept where it was made; others get a handle to it."""

    secret = "class attribute"

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.threads: set[str] = set()
        self.size_reads = 0

    def describe(self) -> str:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return f"model {self.name}"

    async def predict(self, x: int) -> int:
        self.calls += 1
        await asyncio.sleep(0)
        return 2 * x

    def same(self, other: object) -> bool:
        """Whether a handle sent back to its owner arrived as this very object."""
        return other is self

    @property
    def size(self) -> int:  # not a method: a handle never reads it
        self.size_reads += 1
        return 7

    def _private(self) -> str:
        return "private"
