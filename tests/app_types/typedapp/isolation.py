"""Registers the application's types; the host and every worker run it."""

from __future__ import annotations

import os

from pyisolate import TypeRegistry

from .results import Device, FolderType, Level, Model, Point, SavedResult


def register_types(registry: TypeRegistry) -> None:
    registry.register(SavedResult, name="app.SavedResult")
    registry.register(FolderType, name="app.FolderType")
    registry.register(Level)
    registry.register(Point)
    registry.register(Device, name="app.Device", encode=str, decode=Device)
    registry.register(Model, by_reference=True)


def needs_numpy(registry: TypeRegistry) -> None:
    """Imports a package the workers' venvs do not have (the host has it)."""
    import numpy

    registry.register(numpy.dtype, encode=str, decode=numpy.dtype)


def child_marker(registry: TypeRegistry) -> None:
    register_types(registry)
    assert os.environ.get("PYISOLATE_CHILD", "0") in ("0", "1")
