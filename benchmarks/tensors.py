"""Tensor passing: cost against size, next to a small call and bytes copied through frames.

    .venv/bin/python benchmarks/tensors.py [--max-mib 1024]

All in one run, medians in microseconds:
- small call: ``nbytes(b"")``, the floor any tensor call pays;
- shared: a tensor already in shared memory (sent once before timing): metadata only;
- fresh: a new tensor each time, moved into shared memory on send (one copy);
- returned: a shared tensor sent and returned (``echo``);
- frames: the same number of bytes sent as a ``bytes`` value (zero-copy send, one copy in).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pyisolate

ROOT = Path(__file__).resolve().parents[1]


async def timed(call, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mib", type=int, default=1024)
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()) / "pyisolate-bench-venvs")
    args = parser.parse_args()
    config = pyisolate.ExtensionManagerConfig(venv_root_path=args.venv_root)
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        ext = await manager.load_extension(pyisolate.ExtensionConfig(
            name="bench-tensors", module_path=ROOT / "tests" / "extensions" / "tensors", share_torch=True))
        for _ in range(200):
            await ext.nbytes(b"")
        small = await timed(lambda: ext.nbytes(b""), 500)
        print(f"small call (nbytes of empty bytes): {small:.0f} us median")
        print(f"{'size':>9} {'shared us':>10} {'x small':>8} {'fresh us':>10} {'returned us':>12} {'frames us':>10}")
        size = 1024
        while size <= args.max_mib << 20:
            reps = 200 if size <= 1 << 20 else 20 if size <= 64 << 20 else 5
            shared_tensor = torch.ones(size // 4)
            await ext.describe(shared_tensor)  # moved into shared memory here, once
            shared = await timed(lambda: ext.describe(shared_tensor), reps)
            returned = await timed(lambda: ext.echo(shared_tensor), reps)
            fresh_samples = []
            for _ in range(reps):
                t = torch.ones(size // 4)
                start = time.perf_counter()
                await ext.describe(t)
                fresh_samples.append((time.perf_counter() - start) * 1e6)
                del t
            frames = "-"
            if size <= 256 << 20:
                payload = bytes(size)
                frames = f"{await timed(lambda: ext.nbytes(payload), reps):.0f}"
                del payload
            label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
            print(f"{label:>9} {shared:>10.0f} {shared / small:>8.2f} {statistics.median(fresh_samples):>10.0f} "
                  f"{returned:>12.0f} {frames:>10}")
            del shared_tensor
            size *= 4


if __name__ == "__main__":
    asyncio.run(main())
