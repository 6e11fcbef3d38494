"""An extension that imports a module of the host application, which is in no venv: it loads
only where the host lists that module's folder in ``host_paths``."""

import os
import sys

import hostapp_mod

from pyisolate import ExtensionBase


class HostApp(ExtensionBase):
    def greeting(self):
        return hostapp_mod.GREETING

    def origin(self):
        return hostapp_mod.__file__

    def sys_path(self):
        return list(sys.path)

    def runtime(self):
        """The folder pyisolate itself is imported from in this worker."""
        import pyisolate

        return os.path.dirname(os.path.dirname(pyisolate.__file__))

    def plant(self):
        """Try to write a file beside the host's module."""
        try:
            with open(os.path.join(os.path.dirname(hostapp_mod.__file__), "planted.py"), "w") as f:
                f.write("GREETING = 'planted'\n")
        except OSError as exc:
            return f"{type(exc).__name__}: errno {exc.errno}"
        return "ok"
