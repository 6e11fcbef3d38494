"""Calls another extension by its name (``pyisolate.get_actor``), once or at a steady rate.

The reload tests use it to check that calls by name follow the extension to its new worker.
"""

import asyncio

import pyisolate
from pyisolate import ExtensionBase


class PeerLoad(ExtensionBase):
    def __init__(self):
        self._load = None
        self._stop = None
        self._calls = set()
        self.sent = 0
        self.answered = 0
        self.failures = []
        self.answers = set()
        self._awaited = None
        self._seen = None

    async def call(self, name, method):
        return await getattr(pyisolate.get_actor(name), method)()

    async def start(self, name, method, rate):
        """Call ``name.method()`` ``rate`` times a second until ``finish()``; return once started."""
        self._stop = asyncio.Event()
        self._load = asyncio.ensure_future(self._run(pyisolate.get_actor(name), method, rate))
        return True

    async def _run(self, proxy, method, rate):
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not self._stop.is_set() and self.sent < rate * 600:  # bounded: 10 minutes' worth at most
            task = asyncio.ensure_future(self._one(proxy, method))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            self.sent += 1
            # The load's pace, not a synchronisation: the next call is due at sent / rate.
            await asyncio.sleep(max(0.0, began + self.sent / rate - loop.time()))

    async def _one(self, proxy, method):
        try:
            answer = await getattr(proxy, method)()
            self.answers.add(answer)
            self.answered += 1
            if answer == self._awaited:
                self._seen.set()
        except BaseException as exc:  # every failure is counted, of any kind
            self.failures.append(f"{type(exc).__name__}: {exc}")

    async def finish(self, awaited=None):
        """Stop the load (once one of its calls answered ``awaited``, if given), wait for every
        call made, and say how it went."""
        if awaited is not None and awaited not in self.answers:
            self._awaited, self._seen = awaited, asyncio.Event()
            await self._seen.wait()  # the caller's timeout bounds it
        self._stop.set()
        await self._load
        await asyncio.gather(*self._calls)
        return {"sent": self.sent, "answered": self.answered, "failed": len(self.failures),
                "failures": self.failures[:3], "answers": sorted(self.answers)}
