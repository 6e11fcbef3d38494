"""Reads from the host's DatabaseAPI: async code awaits, plain code uses pyisolate.sync()."""

import inspect

from services import DatabaseAPI

import pyisolate
from pyisolate import ExtensionBase


class Reader(ExtensionBase):
    async def lookup(self, key):
        return await DatabaseAPI().get(key)

    async def all_keys(self):
        return await DatabaseAPI().keys()  # a coroutine host method

    def lookup_blocking(self, key):
        # A plain method runs in a thread of the extension's pool: block there with sync().
        return pyisolate.sync(DatabaseAPI()).get(key)

    async def what_is_it(self):
        """What DatabaseAPI() is in this process, and where its methods run."""
        db = DatabaseAPI()
        pid = db.pid()
        if inspect.isawaitable(pid):  # a proxy: every call is awaited
            pid = await pid
        return type(db).__name__, pid
