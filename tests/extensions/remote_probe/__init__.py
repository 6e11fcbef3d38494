"""An extension the remote tests run on "another machine": echoes, calls back, counts its calls."""

import os

import pyisolate
from pyisolate import ExtensionBase


class RemoteProbe(ExtensionBase):
    def __init__(self):
        self.calls = 0

    def echo(self, value):
        self.calls += 1
        return value

    async def call_back(self, fn, value):
        """Call the host: ``fn`` is a callable of the host's, it runs there."""
        self.calls += 1
        return await fn(value)

    def shout(self, name, value):
        pyisolate.emit(name, value)

    def double(self, array):
        """A numpy array or a tensor, back doubled (computed here)."""
        self.calls += 1
        return array * 2

    async def relay_double(self, name, array):
        """Have extension ``name`` double ``array``: sent from this worker to that one directly."""
        return await pyisolate.get_actor(name).double(array)

    def count(self):
        return self.calls

    def pid(self):
        return os.getpid()

    def marker(self, path):
        """Write ``path`` (on this worker's machine) as proof it ran."""
        with open(path, "w") as handle:
            handle.write("ran")

    async def hang(self):
        """Never answers (until the worker goes)."""
        import asyncio

        await asyncio.Event().wait()
