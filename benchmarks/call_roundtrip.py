"""Small-call round trip: pyisolate against the bare-pyzmq direct floor, measured in one run.

    .venv/bin/python benchmarks/call_roundtrip.py [--calls 3000]

The direct floor is an asyncio ROUTER in this process talking straight to a DEALER echo loop
in another process, with msgpack headers and no framework. Every pyisolate figure is printed
with its ratio to that floor. Medians and p99 of per-call latency, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

import pyisolate

ROOT = Path(__file__).resolve().parents[1]

ECHO_SERVER = """
import sys, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1])
s.send_multipart([b"ready", b""])
while True:
    header, body = s.recv_multipart()
    kind, call_id = msgpack.unpackb(header)[:2]
    if kind == 0:
        break
    s.send_multipart([msgpack.packb([7, call_id]), msgpack.packb(msgpack.unpackb(body)[0][0])])
"""


def summarize(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


async def direct_floor(calls: int) -> list[float]:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    directory = tempfile.mkdtemp(prefix="pyisolate-bench-")
    router.bind(f"ipc://{directory}/floor")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ECHO_SERVER, f"ipc://{directory}/floor")
    try:
        rid = (await router.recv_multipart())[0]
        samples = []
        for i in range(calls):
            start = time.perf_counter()
            await router.send_multipart([rid, msgpack.packb([6, i, "echo"]), msgpack.packb([[1], {}])])
            await router.recv_multipart()
            samples.append((time.perf_counter() - start) * 1e6)
        await router.send_multipart([rid, msgpack.packb([0, 0]), b""])
        await proc.wait()
        return samples
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        router.close()
        ctx.term()


async def pyisolate_calls(calls: int, venv_root: Path) -> dict[str, list[float]]:
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root)
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        extension = await manager.load_extension(
            pyisolate.ExtensionConfig(name="bench", module_path=ROOT / "tests" / "extensions" / "ok")
        )
        results = {}
        for label, method in (("async method", extension.aecho), ("plain method", extension.echo)):
            for _ in range(200):  # warm up
                await method(1)
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                await method(1)
                samples.append((time.perf_counter() - start) * 1e6)
            results[label] = samples
        return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()) / "pyisolate-bench-venvs")
    args = parser.parse_args()
    floor = await direct_floor(args.calls)
    ours = await pyisolate_calls(args.calls, args.venv_root)
    floor_median, floor_p99 = summarize(floor)
    print(f"{'measure':<34}{'median us':>10}{'p99 us':>10}{'x floor':>9}")
    print(f"{'direct floor (ROUTER<->DEALER)':<34}{floor_median:>10.0f}{floor_p99:>10.0f}{1.0:>9.2f}")
    for label, samples in ours.items():
        median, p99 = summarize(samples)
        print(f"{'pyisolate host->ext, ' + label:<34}{median:>10.0f}{p99:>10.0f}{median / floor_median:>9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
