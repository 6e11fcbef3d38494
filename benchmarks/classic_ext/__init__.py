"""Extension classes for the classic pyisolate 0.10.2, imported by benchmarks/classic_ext/driver.py.

Only the throwaway venv that benchmarks/classic.py builds can import this package: ``pyisolate``
here is the classic one from PyPI, not ours. Classic pyisolate wants the class it instantiates in
the child (the ``extension_type`` given to ``ExtensionManager``) importable by module name, and
every method the host calls must be an ``async def`` on that class; the directory handed over as
``module_path`` (``plugin/``) is merely imported and passed to ``on_module_loaded``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from pyisolate import ExtensionBase, ProxiedSingleton


class BenchSingleton(ProxiedSingleton):
    """Lives in the host; the extension reaches it through classic's proxy."""

    async def ping(self, x: int) -> int:
        return x


class BenchExtension(ExtensionBase):
    """The extension side of every measure: small replies only."""

    async def echo(self, x: Any) -> Any:
        return x

    async def nbytes(self, data: bytes) -> int:
        return len(data)

    async def numel(self, tensor: Any) -> int:
        return int(tensor.numel())

    async def singleton_roundtrips(self, calls: int, warmup: int) -> dict[str, float]:
        """Time ``calls`` round trips to the host's BenchSingleton, measured in this process."""
        singleton = BenchSingleton()  # classic injects the remote proxy for apis=[BenchSingleton]
        for i in range(warmup):
            await singleton.ping(i)
        samples = []
        for i in range(calls):
            start = time.perf_counter()
            await singleton.ping(i)
            samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        return {"median_us": statistics.median(samples), "p99_us": samples[max(0, int(len(samples) * 0.99) - 1)]}
