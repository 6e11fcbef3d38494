"""A node pack that looks around more than it should: each method says what it got."""

import os
import socket
import tempfile

from pyisolate import ExtensionBase


def _try(action):
    try:
        return action() or "ok"
    except OSError as exc:
        return f"refused ({type(exc).__name__})"


class Curious(ExtensionBase):
    def read(self, path):
        return _try(lambda: open(path).read().strip())

    def write(self, path, text):
        def go():
            with open(path, "w") as f:
                f.write(text)
        return _try(go)

    def phone_home(self, port):
        return _try(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())

    def signal_host(self, pid):
        return _try(lambda: os.kill(pid, 0))

    def scratch(self):
        """Its own temp dir is writable (and removed when it stops)."""
        return _try(lambda: open(os.path.join(tempfile.gettempdir(), "note.txt"), "w").close())
