"""A node pack as a ComfyUI-like host loads it: share_torch, plain (non-async) node methods.

``node`` returns a fresh tensor each call, as a real node does; the same function runs
in-process for the baseline (``nodes.node``).
"""

from pyisolate import ExtensionBase

from . import nodes


class NodePack(ExtensionBase):
    def node(self, image, scale):
        return nodes.node(image, scale)

    def smaps_rollup(self):
        """This worker's /proc/self/smaps_rollup (it is non-dumpable: only it can read it)."""
        with open("/proc/self/smaps_rollup") as f:
            return f.read()
