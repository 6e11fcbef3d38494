"""Load from many callers: fan-in to one busy actor, floods, and gates that hold calls open."""

import asyncio
import collections
import statistics
import time

import pyisolate
from pyisolate import ExtensionBase
from shared_api import DatabaseAPI


class FanIn(ExtensionBase):
    def __init__(self):
        self.gates = collections.deque()
        self.open_all = False
        self.flood = []

    async def block_loop(self, seconds):
        """Keep this worker's event loop busy (no message is read meanwhile); say so first."""
        pyisolate.emit("blocking", seconds)
        time.sleep(seconds)
        return True

    async def echo(self, value):
        return value

    async def slow_echo(self, value, seconds):
        await asyncio.sleep(seconds)
        return value

    async def fan_slow(self, target, n, seconds):
        """Call ``target.slow_echo(i, seconds)`` n times at once; right answers, and errors by type."""
        actor = pyisolate.get_actor(target)
        results = await asyncio.gather(*(actor.slow_echo(i, seconds) for i in range(n)), return_exceptions=True)
        errors, examples = {}, {}
        for r in results:
            if isinstance(r, BaseException):
                key = f"{type(r).__module__}.{type(r).__name__}"
                errors[key] = errors.get(key, 0) + 1
                examples.setdefault(key, str(r)[:300])
        return sum(1 for i, r in enumerate(results) if r == i), errors, examples

    async def fan(self, target, n, method="echo"):
        """Call ``target.method(i)`` n times at once; return how many came back right, and errors."""
        actor = pyisolate.get_actor(target)
        results = await asyncio.gather(*(getattr(actor, method)(i) for i in range(n)), return_exceptions=True)
        errors = [f"{type(r).__module__}.{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        return sum(1 for i, r in enumerate(results) if r == i), errors[:5]

    # -- gates: calls held open until released, each start and end reported as an event ----

    async def gate(self, sender, i):
        opened = asyncio.Event()
        if self.open_all:
            opened.set()
        self.gates.append(opened)
        pyisolate.emit("gate", ("start", sender, i))
        await opened.wait()
        pyisolate.emit("gate", ("end", sender, i))
        return i

    async def release(self, n):
        """Let the ``n`` oldest held calls end."""
        for _ in range(n):
            self.gates.popleft().set()
        return n

    async def release_all(self):
        """Let every held call end, and every later one pass."""
        self.open_all = True
        while self.gates:
            self.gates.popleft().set()
        return True

    async def fan_gate(self, target, n):
        """Call ``target.gate(me, i)`` n times at once (this extension's own slots apply)."""
        me = pyisolate._rpc.context.worker_endpoint().name.decode()
        actor = pyisolate.get_actor(target)
        return await asyncio.gather(*(actor.gate(me, i) for i in range(n)))

    async def call(self, target, method, *args):
        return await getattr(pyisolate.get_actor(target), method)(*args)

    def refused(self):
        return pyisolate._rpc.context.worker_endpoint().server.refused

    # -- floods of a shared singleton ------------------------------------------------------

    async def start_flood(self, n):
        """Fire ``n`` calls at the DatabaseAPI singleton without awaiting them here."""
        api = DatabaseAPI()
        self.flood = [asyncio.ensure_future(api.get(i)) for i in range(n)]
        return n

    async def flood_done(self):
        results = await asyncio.gather(*self.flood, return_exceptions=True)
        self.flood = []
        return sum(1 for r in results if not isinstance(r, BaseException)), len(results)

    async def latencies(self, n):
        """Median and worst seconds of ``n`` calls, one after the other, to the singleton."""
        api, seconds = DatabaseAPI(), []
        for i in range(n):
            began = time.perf_counter()
            await api.get(i)
            seconds.append(time.perf_counter() - began)
        return statistics.median(seconds), max(seconds)
