"""Emits events to the host, from a coroutine and from a thread; emit() never waits."""

import threading

import pyisolate
from pyisolate import ExtensionBase


class Watcher(ExtensionBase):
    async def scan(self, files):
        for i, name in enumerate(files, 1):
            pyisolate.emit("progress", {"file": name, "done": i, "of": len(files)})
        pyisolate.emit("finished", len(files))
        return f"emitted {len(files)} progress events without waiting for any handler"

    def scan_in_thread(self, files):
        def work():
            for name in files:
                pyisolate.emit("found", name)
            pyisolate.emit("finished", len(files))

        threading.Thread(target=work).start()
        return "thread started"

    async def misbehave(self):
        pyisolate.emit("progress", "not a dict")  # the host's handler will raise on this
        pyisolate.emit("finished", 0)
