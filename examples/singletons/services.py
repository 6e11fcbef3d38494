"""The host application's shared services.

Each class is a ProxiedSingleton: the host holds the one real instance, and an extension that
lists the class in ``ExtensionConfig(apis=[...])`` gets a proxy to it. Extension processes
import this file too (by its path), so it imports nothing but the standard library and
pyisolate at module level.
"""

import asyncio
import os
import threading
import time

from pyisolate import ProxiedSingleton


class DatabaseAPI(ProxiedSingleton):
    """A tiny key-value store that lives in the host."""

    def __init__(self):
        self.data = {}
        self._lock = threading.Lock()  # plain methods run in a thread pool

    def set(self, key, value):
        with self._lock:
            self.data[key] = value

    def get(self, key):
        with self._lock:
            return self.data.get(key)

    async def keys(self):
        await asyncio.sleep(0)
        return sorted(self.data)

    def slow_report(self, seconds):
        time.sleep(seconds)  # a blocking call: it occupies a pool thread, not the host's loop
        return f"report of {len(self.data)} keys after {seconds} s"

    def pid(self):
        return os.getpid()
