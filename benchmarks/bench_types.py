"""The benchmark host's own types (``ExtensionManagerConfig.types``): a record by value, an object by reference."""

from __future__ import annotations

import dataclasses

from pyisolate import TypeRegistry


@dataclasses.dataclass
class Record:
    """Six fields of the kinds a node's result has; ``FIELDS`` is the same as a plain dict."""

    filename: str
    subfolder: str
    width: int
    height: int
    scale: float
    enabled: bool


FIELDS = {"filename": "out_00001.png", "subfolder": "renders", "width": 1024, "height": 768, "scale": 1.5,
          "enabled": True}


class Echo:
    """Kept in the host; the extension calls it through a handle (or, as the floor, a singleton)."""

    async def echo(self, value):
        return value


def register_types(registry: TypeRegistry) -> None:
    registry.register(Record, name="bench.Record")
    registry.register(Echo, by_reference=True)
