"""Measure the classic pyisolate 0.10.2 from inside its throwaway venv; print one JSON line.

    <throwaway venv>/bin/python -m classic_ext.driver --venv-root DIR [--quick]   (cwd: benchmarks/)

Started by benchmarks/classic.py, which reads the last stdout line. Everything else (classic's
logs, uv, the children, which inherit fd 1) is moved to stderr before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyisolate
import torch

from classic_ext import BenchExtension, BenchSingleton

PLUGIN = Path(__file__).resolve().with_name("plugin")
TENSORS = {"1KiB": 1 << 10, "64MiB": 64 << 20, "1GiB": 1 << 30}  # bytes, float32


def summary_us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_us": statistics.median(ordered), "p99_us": ordered[max(0, int(len(ordered) * 0.99) - 1)]}


def progress(message: str) -> None:
    print(f"[classic driver] {message}", file=sys.stderr, flush=True)


def load(venv_root: Path) -> tuple[Any, Any]:
    """Create a manager and an extension; classic starts the child on the first attribute access."""
    config = pyisolate.ExtensionManagerConfig(venv_root_path=str(venv_root))
    manager = pyisolate.ExtensionManager(BenchExtension, config)
    ext = manager.load_extension(
        pyisolate.ExtensionConfig(
            name="classic_bench",
            module_path=str(PLUGIN),
            isolated=True,
            dependencies=[],  # nothing for uv to install; torch comes from the host (share_torch)
            apis=[BenchSingleton],
            share_torch=True,
            share_cuda_ipc=False,  # set explicitly, else classic probes CUDA
            sandbox_mode=pyisolate.SandboxMode.DISABLED,  # no bubblewrap here
        )
    )
    return manager, ext


async def per_call(call: Any, samples: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1e6)
    return times


async def measure(venv_root: Path, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"version": pyisolate.__version__, "notes": []}
    notes: list[str] = results["notes"]

    built = "reusing" if (venv_root / "classic_bench").exists() else "building"
    start = time.perf_counter()
    manager, ext = load(venv_root)
    try:
        assert await ext.echo(7) == 7
        notes.append(f"first load, {built} the extension venv: {time.perf_counter() - start:.2f} s")
        progress("host_ext_call")
        times = await per_call(lambda: ext.echo(1), 300 if quick else 3000, 200)
        results["host_ext_call"] = summary_us(times)

        progress("throughput_64")
        batches = 10 if quick else 80
        await asyncio.gather(*(ext.echo(i) for i in range(64)))
        start = time.perf_counter()
        for _ in range(batches):
            await asyncio.gather(*(ext.echo(i) for i in range(64)))
        results["throughput_64"] = {"calls_per_s": batches * 64 / (time.perf_counter() - start)}

        progress("ext_singleton_call")
        results["ext_singleton_call"] = await ext.singleton_roundtrips(300 if quick else 2000, 100)

        progress("bytes_1MiB")
        payload = os.urandom(1 << 20)
        times = await per_call(lambda: ext.nbytes(payload), 10 if quick else 40, 3)
        results["bytes_1MiB"] = {"median_us": statistics.median(times)}
        notes.append("bytes travel base64-encoded inside classic's JSON messages")

        for label, size in TENSORS.items():
            if quick and label == "1GiB":
                continue
            progress(f"tensor_shared_{label}")
            tensor = torch.zeros(size // 4, dtype=torch.float32)
            # The warm-up's first send moves the tensor into shared memory; later sends only name it.
            times = await per_call(lambda t=tensor: ext.numel(t), 50 if quick else 200, 5)
            results[f"tensor_shared_{label}"] = {"median_us": statistics.median(times)}
            if size > 500 << 20:
                notes.append(f"tensor_shared_{label} includes the warning classic logs on every send over 500 MB")
            del tensor
            pyisolate.flush_tensor_keeper()  # classic keeps sent tensors alive for 5 s
    finally:
        manager.stop_all_extensions()

    progress("warm_start_s")
    starts = []
    for _ in range(1 if quick else 5):
        start = time.perf_counter()
        manager, ext = load(venv_root)
        try:
            await ext.echo(0)
            starts.append(time.perf_counter() - start)
        finally:
            manager.stop_all_extensions()
    results["warm_start_s"] = {"median_s": statistics.median(starts)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--venv-root", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    results = asyncio.run(measure(args.venv_root, args.quick))
    out.write(json.dumps(results) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
