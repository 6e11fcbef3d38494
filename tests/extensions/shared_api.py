"""Shared services of the test host: ProxiedSingletons that extensions call."""

import asyncio
import os
import threading

from pyisolate import ProxiedSingleton


class DatabaseAPI(ProxiedSingleton):
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value

    def get(self, key):
        return self.data.get(key)

    async def aget(self, key):
        await asyncio.sleep(0)
        return self.data.get(key)

    def pid(self):
        return os.getpid()

    async def loop_id(self):
        return id(asyncio.get_running_loop())

    async def run_callback(self, fn, *args):
        result = fn(*args)
        return await result if asyncio.iscoroutine(result) or asyncio.isfuture(result) else result

    def make_secret(self):
        return lambda: "singleton secret"


class SlowService(ProxiedSingleton):
    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def block(self):
        self.entered.set()
        self.release.wait(60)
        return "unblocked"
