"""An extension whose methods give the host's statistics and inspection tools something to see:
fast answers, typed failures, slow answers, and busy loops (one bounded, one endless)."""

import asyncio
import os
import time

from pyisolate import ExtensionBase


class ObservedExtension(ExtensionBase):
    def echo(self, value):
        return value

    def fail(self, kind):
        raise {"value": ValueError, "key": KeyError}[kind](f"asked to fail with {kind}")

    async def slow(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    def spin_forever(self):
        """A plain method that never returns: a stuck plugin (its worker's thread spins)."""
        while True:
            pass

    async def block_loop_forever(self):
        """A coroutine method that never yields: the worker's event loop is blocked."""
        while True:
            pass

    def busy_for(self, seconds):
        """Burn CPU in this very function for ``seconds`` (what a profile should show)."""
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return n

    def crash(self):
        os._exit(3)

    def pid(self):
        return os.getpid()

    def resident_bytes(self):
        """This process's resident memory as it sees it itself."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def hold_gil(self):
        """Stuck in C code that holds the GIL, on the worker's loop (catastrophic backtracking)."""
        import re

        return bool(re.match(r"(a+)+$", "a" * 40 + "!"))
