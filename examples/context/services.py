"""A host service that reports which thread (hence which event loop) serves its calls."""

import threading

from pyisolate import ProxiedSingleton


class LoopProbe(ProxiedSingleton):
    async def where(self):
        return threading.current_thread().name
