"""An extension the reload tests copy to a temporary folder, edit and reload.

``VERSION`` is the line the tests rewrite; every answer that says which code ran carries it.
"""

import asyncio
import os

import pyisolate
from pyisolate import ExtensionBase

VERSION = "v1"


class Gate:
    """Held by reference by the host: opening it lets ``Reloadable.hold()`` return."""

    def __init__(self, event):
        self._event = event

    async def open(self):
        self._event.set()
        return VERSION


class Reloadable(ExtensionBase):
    def __init__(self):
        self._released = asyncio.Event()

    def version(self):
        return VERSION

    def pid(self):
        return os.getpid()

    def gate(self):
        return pyisolate.handle(Gate(self._released))

    def greeter(self):
        def greet(name):
            return f"{VERSION}: hello {name}"

        return greet

    def emit_event(self, name, value):
        pyisolate.emit(name, value)

    async def count(self, n):
        for i in range(n):
            yield i

    async def hold(self):
        """Say (by an event) that it is running, then wait for the gate; answer with this code's version."""
        pyisolate.emit("holding", os.getpid())
        await self._released.wait()
        return VERSION
