"""The start-up benchmark's extension: nothing imported beyond what every worker has.

``benchmarks/startup.py`` loads it to time start-up and to weigh an idle worker. It imports
no singleton API, so its figures are pyisolate's own. ``with_torch.py`` beside it is the
same extension after ``import torch`` (loaded with ``share_torch=True``).
"""

import os

from pyisolate import ExtensionBase


class Idle(ExtensionBase):
    async def ping(self):
        return os.getpid()

    async def smaps_rollup(self):
        """Our memory figures: a worker is non-dumpable, so only root could read them from outside."""
        with open("/proc/self/smaps_rollup") as f:
            return f.read()
