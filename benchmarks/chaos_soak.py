"""Chaos soak: steady load on several extensions while random workers are SIGKILLed.

    .venv/bin/python benchmarks/chaos_soak.py [--seconds 120] [--extensions 4] [--clients 16]

Every call ends one of three ways: an answer, a typed pyisolate error (crash, timeout,
closed), or *lost* (no end within 30 s: must be 0). Extensions restart per their
RestartPolicy. At the end, leaked child processes, file descriptors and segment descriptors
the host still holds for workers are counted (must be 0). The suite runs a short version (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy

import pyisolate
from pyisolate import _shm

ROOT = Path(__file__).resolve().parents[1]


def _children() -> set[int]:
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids.update(int(p) for p in f.read().split())
    return pids


async def soak(venv_root: Path, seconds: float, extensions: int = 4, clients: int = 16,
               kill_every: float = 1.0, seed: int = 0) -> dict[str, int]:
    """Run the soak and return its counts."""
    rng = random.Random(seed)
    counts = {"ok": 0, "typed_errors": 0, "lost": 0, "kills": 0, "restarts": 0}
    fds_before = len(os.listdir("/proc/self/fd"))
    policy = pyisolate.RestartPolicy(max_restarts=10_000, within=1.0, backoff=0.05)
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root, call_timeout=10)
    deadline = time.monotonic() + seconds
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        names = [f"soak{i}" for i in range(extensions)]
        handles = [manager.load_extension(pyisolate.ExtensionConfig(
            name=n, module_path=ROOT / "tests" / "extensions" / "ok", restart=policy,
            dependencies=["numpy>=2"])) for n in names]
        await asyncio.gather(*handles)
        big = numpy.ones(1 << 18)  # 2 MiB: travels through shared memory

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                target = handles[rng.randrange(extensions)]
                value = big if n % 10 == 0 else (i, n, b"x" * rng.randrange(100))
                try:
                    async with asyncio.timeout(30):
                        await target.echo(value)
                    counts["ok"] += 1
                except pyisolate.PyisolateError:
                    counts["typed_errors"] += 1
                except TimeoutError:
                    counts["lost"] += 1

        async def killer() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(kill_every * rng.uniform(0.5, 1.5))  # the chaos cadence
                target = manager._extensions.get(rng.choice(names))
                process = getattr(target, "process", None)
                if process is not None and process.returncode is None:
                    os.kill(process.pid, signal.SIGKILL)
                    counts["kills"] += 1

        await asyncio.gather(killer(), *(client(i) for i in range(clients)))
        counts["restarts"] = sum(getattr(manager._extensions.get(n), "restart_count", 0) for n in names)
    counts["leaked_processes"] = len(_children())
    counts["leaked_fds"] = max(0, len(os.listdir("/proc/self/fd")) - fds_before)
    counts["leaked_segments"] = _shm.stats().get("worker_fds", 0)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--extensions", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=1.0)
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()) / "pyisolate-bench-venvs")
    args = parser.parse_args()
    counts = asyncio.run(soak(args.venv_root, args.seconds, args.extensions, args.clients, args.kill_every))
    for key, value in counts.items():
        print(f"{key:>17}: {value}")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
