"""Calls back into the host while serving a call from it."""

from services import LoopProbe

from pyisolate import ExtensionBase


class Relay(ExtensionBase):
    async def recurse(self, n, host_step):
        # Serving a host call, it calls the host again: the chain goes on.
        return [f"ext({n})", *await host_step(n)]

    async def call_back(self, fn):
        return await fn()

    async def ask_probe(self):
        return await LoopProbe().where()
