"""Writes into the host's DatabaseAPI."""

import os

from services import DatabaseAPI  # imported from the host's services.py

from pyisolate import ExtensionBase


class Writer(ExtensionBase):
    async def save(self, key, value):
        await DatabaseAPI().set(key, value)  # a plain host method, awaited all the same
        return f"saved {key!r} from pid {os.getpid()}"

    async def slow_report(self, seconds):
        return await DatabaseAPI().slow_report(seconds)
