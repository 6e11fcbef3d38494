"""A host in a process of its own, for shared-memory scenarios that could kill it.

    python tests/shm_host.py SCENARIO VENV_ROOT

Runs one scenario and prints its findings as JSON on the last line of stdout. A host that
dies (SIGBUS) exits with a negative status, so the test that ran it fails instead of pytest
dying with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy  # noqa: E402
import torch  # noqa: E402

import pyisolate  # noqa: E402
from pyisolate._wire import shm as _shm  # noqa: E402

HOSTILE = str(ROOT / "tests" / "extensions" / "hostile_shm")
TENSORS = str(ROOT / "tests" / "extensions" / "tensors")
DEADLINE = 120


def checksum(t: torch.Tensor) -> int:
    """The sum of the tensor's bytes, as the extension computes it."""
    return int(t.contiguous().view(torch.uint8).long().sum())


class Records(logging.Handler):
    """The host's log records, to count warnings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def copies(self) -> list[str]:
        return [r.getMessage() for r in self.records if "travels as a copy" in r.getMessage()]


async def truncate_theirs(manager: Any, records: Records) -> dict[str, Any]:
    """(a) The extension sends us a tensor, then shrinks every segment it can; we read ours."""
    hostile = await load(manager, "hostile", HOSTILE)
    x = await hostile.make(1 << 20)  # 4 MiB, in the extension's segment, mapped here
    report = await hostile.shrink_everything(os.getpid())
    total = float(x.double().sum())  # touches every page
    return {**report, "sum_ok": total == float(sum(range(1 << 20)))}


async def truncate_ours(manager: Any, records: Records) -> dict[str, Any]:
    """(b) We send the extension a tensor; it shrinks every segment it can; we use ours."""
    hostile = await load(manager, "hostile", HOSTILE)
    y = torch.arange(1 << 20, dtype=torch.float32)
    await hostile.keep(y)
    report = await hostile.shrink_everything(os.getpid())
    y.add_(1)
    return {**report, "sum_ok": float(y.double().sum()) == float(sum(range(1, (1 << 20) + 1)))}


async def small_dev_shm(manager: Any, records: Records) -> dict[str, Any]:
    """A 64 MiB /dev/shm, as in Docker: 100 MiB tensors, and 16 MiB while the plugin holds 60."""
    vfs = os.statvfs("/dev/shm")
    hostile = await load(manager, "hostile", HOSTILE)
    big = torch.rand(25 << 20)  # 100 MiB
    back = await hostile.echo(big)
    results = {"dev_shm_bytes": vfs.f_blocks * vfs.f_frsize,
               "big_ok": await hostile.checksum(big) == checksum(big) and torch.equal(back, big),
               "big_shared": _shm.find(back.untyped_storage().data_ptr()) is not None}
    del back, big
    results["dev_shm_free_after_fill"] = await hostile.fill_dev_shm(60 << 20)
    mid = torch.rand(4 << 20)  # 16 MiB
    back = await hostile.echo(mid)
    results["mid_ok"] = await hostile.checksum(mid) == checksum(mid) and torch.equal(back, mid)
    results["mid_shared"] = _shm.find(back.untyped_storage().data_ptr()) is not None
    results["made_ok"] = (await hostile.make(4 << 20)).tolist()[-1] == float((4 << 20) - 1)
    await hostile.release_dev_shm()
    results["copies"] = records.copies()
    return results


async def host_fallback(manager: Any, records: Records) -> dict[str, Any]:
    """No segment can be reserved in the host (RLIMIT_FSIZE): values still arrive, one warning."""
    hostile = await load(manager, "hostile", HOSTILE)
    arrays = await load(manager, "np", TENSORS, dependencies=["numpy>=2"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    t = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    a = numpy.arange(1 << 19, dtype=numpy.float64)  # 4 MiB
    results = {
        "tensor_ok": await hostile.checksum(t) == checksum(t),
        "tensor_private": _shm.find(t.untyped_storage().data_ptr()) is None,
        "array_ok": bool(numpy.array_equal(await arrays.echo(a), a)),
        "tensor_again_ok": await hostile.checksum(t) == checksum(t),
        "array_again_ok": bool(numpy.array_equal(await arrays.echo(a), a)),
        "copies": records.copies(),
    }
    return results


async def load(manager: Any, name: str, path: str, **kw: Any) -> Any:
    return await manager.load_extension(pyisolate.ExtensionConfig(name=name, module_path=path, share_torch=True, **kw))


SCENARIOS: dict[str, Callable[[Any, Records], Awaitable[dict[str, Any]]]] = {
    f.__name__: f for f in (truncate_theirs, truncate_ours, small_dev_shm, host_fallback)
}


async def main(scenario: str, venv_root: str) -> None:
    records = Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.WARNING)
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root)
    async with asyncio.timeout(DEADLINE), pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        result = await SCENARIOS[scenario](manager, records)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
