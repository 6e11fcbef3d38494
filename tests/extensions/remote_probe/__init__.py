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

    def read(self, path):
        """The text of ``path`` on this worker's machine, or what stopped it being read."""
        try:
            with open(path) as handle:
                return handle.read()
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror}"

    def open_files_limit(self):
        """This worker's soft limit of open files (RLIMIT_NOFILE)."""
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    def connect(self, port):
        """Open a TCP connection to 127.0.0.1:``port`` here: "connected", or what stopped it."""
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return "connected"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror}"

    async def hang(self):
        """Never answers (until the worker goes)."""
        import asyncio

        await asyncio.Event().wait()
