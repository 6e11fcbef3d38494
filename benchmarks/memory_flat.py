"""Memory under use: host and worker USS after 20 and after 300 node calls, each returning a
fresh 12 MiB image tensor (a share_torch extension, a plain method, called from a thread as
a synchronous host does). Run alone: ``python benchmarks/memory_flat.py [--quick]``.

What stays in a process after its work is what grows: glibc keeping freed 12 MiB buffers in
its heaps (workers fix glibc's mmap threshold, ``workers/malloc.py``), segments made and torn
down per tensor (the shared-memory pool reuses them). Target: after 300 calls, within +10% of
where each process was after 20.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bench_api

import pyisolate
from common import BENCH_EXT, Result, memory_from, memory_of, section_main

IMAGE = 12 << 20  # a 1024 x 1024 x 3 float32 image
EARLY, LATE = 20, 300


async def measure(work: Path, quick: bool) -> list[Result]:
    import torch

    config = pyisolate.ExtensionManagerConfig(venv_root_path=work / "venvs")
    figures: dict[str, dict[int, float]] = {"host": {}, "worker": {}}
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        ext = await manager.load_extension(pyisolate.ExtensionConfig(
            name="bench-flat", module_path=BENCH_EXT, apis=[bench_api.BenchService], share_torch=True))
        image = torch.rand(IMAGE // 4)
        blocking = pyisolate.sync(ext)

        def node(x: object) -> object:  # a synchronous host thread calling a node
            return blocking.node(x)

        for done in range(1, LATE + 1):
            image = await asyncio.to_thread(node, image)
            if done in (EARLY, LATE):
                figures["host"][done] = memory_of(os.getpid())["uss"]
                figures["worker"][done] = memory_from(await ext.smaps_rollup())["uss"]
    results: list[Result] = []
    for side in ("host", "worker"):
        early = Result(f"memory.flat.{side}.{EARLY}", "memory under use", f"{side} USS after {EARLY} node calls",
                       figures[side][EARLY], "MB")
        late = Result(f"memory.flat.{side}.{LATE}", "memory under use", f"{side} USS after {LATE} node calls",
                      figures[side][LATE], "MB", baseline=early.name, target=1.1,
                      target_note=f"<= +10% of the USS after {EARLY} calls")
        late.ci_check = False  # one process's memory at two moments, on a shared machine: reported
        results += [early, late]
    return results


if __name__ == "__main__":
    section_main(measure, __doc__, "pyisolate-flat-")
