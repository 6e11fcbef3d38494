"""Receives callables from the host, keeps one for later, and hands callables back."""

import os

from pyisolate import ExtensionBase


class Tools(ExtensionBase):
    def __init__(self):
        self.listener = None
        self.made = None

    async def apply(self, fn, values):
        # fn is a reference to a callable of the host: calling it returns an awaitable.
        return [await fn(v) for v in values]

    async def subscribe(self, listener):
        self.listener = listener  # keeping the reference keeps the host's object alive

    async def run_job(self, steps):
        for step in range(1, steps + 1):
            await self.listener(step, steps)
        return f"job of {steps} steps done in pid {os.getpid()}"

    async def unsubscribe(self):
        self.listener = None  # dropping it releases the host's object

    async def ping(self):
        return "pong"

    def make_multiplier(self, k):
        self.made = lambda x: x * k
        return self.made  # travels to the caller as a reference

    async def is_original(self, fn):
        # A reference of ours, passed back to us, arrives as the original object.
        return fn is self.made
