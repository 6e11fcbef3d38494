"""An extension that starts grandchildren of every kind, and ends itself in every way.

Each grandchild waits forever (``signal.pause()``) and keeps the worker's stdout and stderr
open, as a careless child would: the tests check that none outlives its worker and that the
host keeps no descriptor of theirs.

Set ``FORKER_ON_LOAD`` to ``exit`` or ``raise`` (and ``FORKER_GATE`` to a FIFO) to start
grandchildren while loading, hand their pids to the test through the FIFO, then fail to load
by ``sys.exit(7)`` or by an exception.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

from pyisolate import ExtensionBase

_PAUSE = "import signal; signal.pause()"
#: A grandchild with a child of its own, whose pid it prints.
_NESTED = (
    "import signal, subprocess, sys; "
    f"child = subprocess.Popen([sys.executable, '-c', {_PAUSE!r}]); "
    "print(child.pid, flush=True); signal.pause()"
)


def _fork_paused() -> int:
    """Plain ``fork``: a copy of the worker, in the worker's process group."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    return pid


def _double_fork_daemon() -> int:
    """The classic daemon: fork, setsid, fork again, and the middle process exits (an orphan)."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read)
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                os.close(write)
                signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(middle, 0)  # the middle process is gone: its child is an orphan now
    with os.fdopen(read, "rb") as f:
        return int(f.read())


class Forker(ExtensionBase):
    def __init__(self):
        self.children = []  # the Popen objects, so that nothing reaps or warns behind our back

    def on_module_loaded(self, module):
        how = os.environ.get("FORKER_ON_LOAD")
        if not how:
            return
        pids = self.spawn()
        with open(os.environ["FORKER_GATE"], "w") as gate:  # blocks until the test opens it
            gate.write(json.dumps(pids))
        with open(os.environ["FORKER_GATE"]) as gate:  # until the test has a pidfd of each
            gate.read()
        if how == "exit":
            sys.exit(7)
        raise RuntimeError("failing to load on purpose")

    def spawn(self):
        """Start one grandchild of each kind (and a great-grandchild); return their pids by kind."""
        popen = subprocess.Popen([sys.executable, "-c", _PAUSE])
        session = subprocess.Popen([sys.executable, "-c", _PAUSE], start_new_session=True)
        nested = subprocess.Popen([sys.executable, "-c", _NESTED], stdout=subprocess.PIPE)
        self.children += [popen, session, nested]
        return {
            "fork": _fork_paused(),
            "popen": popen.pid,
            "setsid": session.pid,
            "daemon": _double_fork_daemon(),
            "nested": nested.pid,
            "nested-child": int(nested.stdout.readline()),
        }

    def pid(self):
        return os.getpid()

    def echo(self, value):
        return value

    async def wait_forever(self):
        await asyncio.Event().wait()

    # -- ways to end -----------------------------------------------------------------------

    async def exit_async(self, code):
        sys.stdout.write("last words, no newline")  # still in the buffer: flushing is the worker's job
        sys.exit(code)

    def exit_plain(self, code):
        sys.stdout.write("last words, no newline")
        sys.exit(code)

    async def exit_stream(self, code):
        yield 1
        sys.stdout.write("last words, no newline")
        sys.exit(code)

    async def exit_in_task(self, code):
        """sys.exit() in a task of the extension's own, not in a method: the method waits."""
        async def exit_in_task_body():
            sys.stdout.write("last words, no newline")
            sys.exit(code)

        self.task = asyncio.get_running_loop().create_task(exit_in_task_body())
        await asyncio.Event().wait()

    async def crash(self, code):
        os._exit(code)

    def hold_the_gil(self):
        import re

        return bool(re.match(r"(a+)+$", "a" * 40 + "!"))  # catastrophic backtracking, GIL held

    async def misbehave_on_stop(self, ignore_sigterm):  # async: runs on the main thread
        self.hang_on_stop = True
        if ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def set_exit_on_stop(self, code):
        self.exit_on_stop = code

    def stop(self):
        if getattr(self, "hang_on_stop", False):
            threading.Event().wait()  # a stop hook that never returns
        code = getattr(self, "exit_on_stop", None)
        if code is not None:
            sys.exit(code)
