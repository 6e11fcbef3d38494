"""The idle extension with torch imported, as a share_torch=True extension has it."""

import os
import warnings

with warnings.catch_warnings():
    # Its venv has no numpy (not a requirement of torch); the bare baseline is run without it too.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

from pyisolate import ExtensionBase


class IdleTorch(ExtensionBase):
    async def ping(self):
        return os.getpid()

    async def smaps_rollup(self):
        """Our memory figures: a worker is non-dumpable, so only root could read them from outside."""
        with open("/proc/self/smaps_rollup") as f:
            return f.read()

    async def torch_file(self):
        return torch.__file__
