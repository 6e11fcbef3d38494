"""A calculator with async and plain methods; plain ones block on remote calls with pyisolate.sync()."""

import pyisolate
from pyisolate import ExtensionBase


class Calc(ExtensionBase):
    async def add(self, a, b):
        pyisolate.emit("log", f"add({a}, {b})")
        return a + b

    def divide(self, a, b):
        return a / b

    def apply_blocking(self, fn, value):
        # A plain method runs in a pool thread with no event loop: it cannot await the
        # host's callable, so it blocks on it with pyisolate.sync().
        return pyisolate.sync(fn)(value)

    async def apply_async(self, fn, value):
        return await fn(value)

    async def try_sync_in_coroutine(self, fn):
        try:
            pyisolate.sync(fn)(1)
        except RuntimeError as exc:
            return f"RuntimeError: {exc}"
        return "unexpectedly worked"
