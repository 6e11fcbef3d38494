"""Async generator methods: each becomes a stream the caller iterates with `async for`."""

import asyncio

from pyisolate import ExtensionBase


class Feed(ExtensionBase):
    def __init__(self):
        self.produced = 0
        self.closed = asyncio.Event()

    async def count(self, n):
        for i in range(n):
            yield i

    async def ticker(self):
        self.produced = 0
        self.closed.clear()
        try:
            while True:
                self.produced += 1
                yield self.produced
        finally:  # runs when the consumer stops early
            self.closed.set()

    async def produced_so_far(self):
        return self.produced

    async def wait_closed(self):
        await asyncio.wait_for(self.closed.wait(), 10)
        return True

    async def broken(self):
        yield "first"
        yield "second"
        raise ValueError("the feed broke")
