"""A well-behaved extension with one method per behaviour the tests look at."""

import asyncio
import os
import subprocess
import sys
import threading

import pyisolate
from pyisolate import ExtensionBase


class CustomError(Exception):
    """Defined only in the extension: the host cannot rebuild it."""


class OkExtension(ExtensionBase):
    # Callable class attributes that are not methods: never callable remotely.
    runner = subprocess.Popen
    system = os.system

    def __init__(self):
        self.hooks = []
        self.release_async = asyncio.Event()
        self.release_sync = threading.Event()
        self.stop_marker = None

    def before_module_loaded(self):
        self.hooks.append("before_module_loaded")

    def on_module_loaded(self, module):
        self.hooks.append(f"on_module_loaded:{module.__name__}")

    def stop(self):
        if getattr(self, "exit_in_stop", False):
            os._exit(0)  # gone before the answer to STOP leaves, as when the broker loses it
        if getattr(self, "hang_on_stop", False):
            threading.Event().wait()  # a stop hook that never returns
        if self.stop_marker:
            with open(self.stop_marker, "w") as f:
                f.write(",".join(self.hooks + ["stop"]))

    async def process_data(self, data):
        return sum(data) / len(data)

    def hook_order(self):
        return self.hooks

    def echo(self, value):
        return value

    def make_bytes(self, n):
        return bytes(n)

    async def aecho(self, *args, **kwargs):
        return args, kwargs

    def pid(self):
        return os.getpid()

    def sys_path(self):
        return list(sys.path)

    def executable(self):
        return sys.executable

    def module_file(self, name):
        __import__(name)
        return sys.modules[name].__file__

    def set_exit_in_stop(self):
        self.exit_in_stop = True

    def imported(self, name):
        """Whether module ``name`` is imported already (without importing it)."""
        return name in sys.modules

    def set_stop_marker(self, path):
        self.stop_marker = path

    def raise_value_error(self, message):
        raise ValueError(message)

    async def raise_timeout(self):
        raise TimeoutError("the extension's own timeout")

    def raise_key_error(self, key):
        return {}[key]

    def raise_custom(self):
        raise CustomError("only the extension knows this type")

    def return_unsendable(self):
        return {"ok": [1, 2, object()]}

    async def wait_async(self):
        await self.release_async.wait()
        return "async released"

    def release_async_waiter(self):
        # Plain methods run in a thread: hand the release to the loop.
        loop = self._loop
        loop.call_soon_threadsafe(self.release_async.set)
        return True

    async def remember_loop(self):
        self._loop = asyncio.get_running_loop()
        return True

    def wait_sync(self):
        pyisolate.emit("waiting", "sync")  # from its pool thread: the call has started
        self.release_sync.wait()
        return "sync released"

    def release_sync_waiter(self):
        self.release_sync.set()
        return True

    async def crash(self, code):
        sys.stderr.write("about to crash on purpose\n")
        sys.stderr.flush()
        os._exit(code)

    async def wait_for_cancel(self):
        self.cancel_seen = asyncio.Event()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancel_seen.set()
            raise

    async def was_cancelled(self):
        await self.cancel_seen.wait()
        return True

    def environment(self, name):
        return os.environ.get(name), sys.flags.no_user_site, list(sys.path)

    def hold_the_gil(self):
        import re

        sys.stderr.write("holding the GIL in C code\n")
        sys.stderr.flush()
        return bool(re.match(r"(a+)+$", "a" * 40 + "!"))  # catastrophic backtracking, GIL held

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def misbehave_on_stop(self, ignore_sigterm):  # async: runs on the main thread
        import signal

        self.hang_on_stop = True
        if ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _private(self):
        return "must not be callable"

    not_a_method = 42
