"""The application's types, registered once: the host and every worker run ``register_types``
(``ExtensionManagerConfig(types="nodeapp.isolation:register_types")``), so both sides know them."""

from __future__ import annotations

from pyisolate import TypeRegistry

from .model import Device, DType, Model
from .results import FolderType, SavedResult


def register_types(registry: TypeRegistry) -> None:
    registry.register(SavedResult)  # a dataclass: travels as its fields, rebuilt by its constructor
    registry.register(FolderType)  # an enum: travels as its value
    registry.register(DType)
    registry.register(Device, encode=str, decode=Device)  # any other class: how to write and read it
    registry.register(Model, by_reference=True)  # never copied: the receiver gets a handle
