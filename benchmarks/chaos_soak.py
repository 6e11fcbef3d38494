"""Chaos soak: steady load and fan-in overload while random workers are SIGKILLed.

    .venv/bin/python benchmarks/chaos_soak.py [--seconds 120] [--extensions 4] [--clients 16]

Two kinds of load run at once, for the whole soak:

- steady: ``clients`` host tasks each call a random extension's ``echo`` with a small value,
  or a 2 MiB array (shared memory), one call after another;
- overload: five extensions and the host each fan 64 calls at once into one slow actor
  (``sink``, each call 20 ms), whose event loop is also blocked for 0.3 s now and then.

Meanwhile a killer SIGKILLs a random worker (any of them, sink and fan callers included)
about every ``kill_every`` seconds; each restarts per its RestartPolicy.

Every call is counted by its end. ``ok``: it returned its own value. ``caused``: it failed
with the documented typed error of a fault that really happened to it (ExtensionCrashedError
while its target, or the extension making it, was killed or restarting). Everything else is
``lost``: a wrong value, a timeout on a worker that was not killed (the call timeout is 10 s),
any other error; ``raw_zmq`` counts zmq exceptions that reached a caller (must be 0 too).
At the end, leaked child processes, file descriptors, and segment descriptors the host still
holds for workers are counted (0).
The suite runs a two-minute version (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy
import zmq

import pyisolate
from pyisolate._wire import shm as _shm

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = ROOT / "tests" / "extensions"
FANNERS = 5
FAN = 64


def _children() -> set[int]:
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids.update(int(p) for p in f.read().split())
    return pids


#: When a call started, the restarts of the actors it involves by then, whether one was down.
Stamp = tuple[float, tuple[int, ...], bool]


class Ledger:
    """Counts each call by how it ended, and knows which faults happened to whom, and when."""

    #: A kill counts for calls that started up to this long after it: the host learns of a death
    #: a little later than the socket does, and calls made meanwhile already meet it.
    NOTICE = 2.0

    def __init__(self, manager: pyisolate.ExtensionManager[Any]) -> None:
        self._manager = manager
        self.counts: collections.Counter[str] = collections.Counter()
        self.lost_by: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}  # the first message of each kind of loss
        self.killed_at: dict[str, list[float]] = collections.defaultdict(list)

    def kill(self, name: str) -> None:
        self.killed_at[name].append(time.monotonic())

    def start(self, *names: str) -> Stamp:
        """What ``ended`` compares with: when the call started, the restarts so far, and
        whether one of ``names`` was down (restarting) already."""
        return time.monotonic(), self._restarts(names), self._down(names)

    def hit(self, before: Stamp, names: tuple[str, ...]) -> bool:
        """Whether one of ``names`` was killed, restarted or down while the call ran."""
        began, restarts, was_down = before
        if was_down or self._restarts(names) != restarts or self._down(names):
            return True
        return any(t >= began - self.NOTICE for n in names for t in self.killed_at[n][-3:])

    def ended(self, outcome: object, expected: object, before: Stamp,
              names: tuple[str, ...], caused: tuple[type[BaseException], ...] = (pyisolate.ExtensionCrashedError,)
              ) -> None:
        if isinstance(outcome, zmq.ZMQError):
            self.counts["raw_zmq"] += 1
            self.lost(type(outcome).__name__)
        elif isinstance(outcome, BaseException):
            hit = self.hit(before, names)
            if isinstance(outcome, caused) and hit:
                self.counts["caused"] += 1
            else:
                why = f"{type(outcome).__name__}{'' if hit else ' (no fault)'}"
                self.examples.setdefault(why, str(outcome)[:300])
                self.lost(why)
        elif _same(outcome, expected):
            self.counts["ok"] += 1
        else:
            self.lost("wrong value")

    def lost(self, why: str, n: int = 1) -> None:
        self.counts["lost"] += n
        self.lost_by[why] += n

    def _restarts(self, names: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(getattr(self._manager._extensions.get(n), "restart_count", 0) for n in names)

    def _down(self, names: tuple[str, ...]) -> bool:
        return any(getattr(self._manager._extensions.get(n), "state", None) is not _READY for n in names)


#: The documented errors of a fault that hit a call from one extension to another: the target
#: (or the extension making the call) crashed (ExtensionCrashedError), or the target was not
#: connected while it restarted (UnroutableError). A call from the host waits for a restart,
#: so for it only ExtensionCrashedError counts.
CAUSED = (pyisolate.ExtensionCrashedError, pyisolate.UnroutableError)


def _same(a: object, b: object) -> bool:
    if isinstance(b, numpy.ndarray):
        return isinstance(a, numpy.ndarray) and a.shape == b.shape and bool((a == b).all())
    return a == b


_READY: Any = None


async def soak(venv_root: Path, seconds: float, extensions: int = 4, clients: int = 16,
               kill_every: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Run the soak and return its counts."""
    global _READY
    from pyisolate._host.worker import State

    _READY = State.READY
    rng = random.Random(seed)
    fds_before = len(os.listdir("/proc/self/fd"))
    policy = pyisolate.RestartPolicy(max_restarts=10_000, within=1.0, backoff=0.05)
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root, call_timeout=10)
    sys.path.insert(0, str(EXTENSIONS))  # the fan-in extension uses the shared_api singletons
    from shared_api import DatabaseAPI

    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        ledger = Ledger(manager)
        names = [f"soak{i}" for i in range(extensions)]
        fanners = [f"fan{i}" for i in range(FANNERS)]
        configs = [pyisolate.ExtensionConfig(name=n, module_path=EXTENSIONS / "ok", restart=policy,
                                             dependencies=["numpy>=2"]) for n in names]
        configs += [pyisolate.ExtensionConfig(name=n, module_path=EXTENSIONS / "fanin", restart=policy,
                                              apis=[DatabaseAPI]) for n in ["sink", *fanners]]
        handles = await manager.load_extensions(configs)
        big = numpy.arange(1 << 18, dtype=numpy.float64)  # 2 MiB: travels through shared memory
        deadline = time.monotonic() + seconds

        async def call(target: str, expected: object, method: str, *args: object,
                       also: tuple[str, ...] = ()) -> None:
            involved = (target, *also)
            before = ledger.start(*involved)
            try:
                outcome = await getattr(handles[target], method)(*args)
            except (pyisolate.PyisolateError, zmq.ZMQError) as exc:
                outcome = exc
            ledger.ended(outcome, expected, before, involved)

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                value = big if n % 10 == 0 else (i, n, b"x" * rng.randrange(100))
                await call(rng.choice(names), value, "echo", value)

        async def fan_from_host() -> None:
            while time.monotonic() < deadline:
                before = ledger.start("sink")
                results = await asyncio.gather(*(handles["sink"].slow_echo(i, 0.02) for i in range(FAN)),
                                               return_exceptions=True)
                for i, outcome in enumerate(results):
                    ledger.ended(outcome, i, before, ("sink",))

        async def fan_from(name: str) -> None:
            while time.monotonic() < deadline:
                before = ledger.start(name, "sink")
                try:
                    right, errors, examples = await handles[name].fan_slow("sink", FAN, 0.02)
                except (pyisolate.PyisolateError, zmq.ZMQError) as exc:  # the fanning extension went down
                    ledger.ended(exc, None, before, (name, "sink"))
                    continue
                ledger.counts["ok"] += right
                hit = ledger.hit(before, (name, "sink"))  # inside the extension: either error counts
                for kind, n in errors.items():
                    if kind in (f"pyisolate.errors.{c.__name__}" for c in CAUSED) and hit:
                        ledger.counts["caused"] += n
                    else:
                        why = f"{kind} in {name}{'' if hit else ' (no fault)'}"
                        ledger.examples.setdefault(why, examples.get(kind, ""))
                        ledger.lost(why, n)

        async def block_sink() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(1.0, 3.0))  # the chaos cadence
                await call("sink", True, "block_loop", 0.3)

        async def killer() -> None:
            victims = [*names, "sink", *fanners]
            while time.monotonic() < deadline:
                await asyncio.sleep(kill_every * rng.uniform(0.5, 1.5))  # the chaos cadence
                name = rng.choice(victims)
                process = getattr(manager._extensions.get(name), "process", None)
                if process is not None and process.returncode is None:
                    ledger.kill(name)
                    os.kill(process.pid, signal.SIGKILL)

        await asyncio.gather(killer(), block_sink(), fan_from_host(), *(fan_from(n) for n in fanners),
                             *(client(i) for i in range(clients)))
        restarts = sum(getattr(manager._extensions.get(n), "restart_count", 0) for n in [*names, "sink", *fanners])
    total = sum(ledger.counts[k] for k in ("ok", "caused", "lost"))
    return {
        "calls": total,
        "ok": ledger.counts["ok"],
        "caused": ledger.counts["caused"],
        "lost": ledger.counts["lost"],
        "lost_rate": ledger.counts["lost"] / total if total else 0.0,
        "lost_by": dict(ledger.lost_by),
        "examples": ledger.examples,
        "raw_zmq": ledger.counts["raw_zmq"],
        "kills": sum(len(times) for times in ledger.killed_at.values()),
        "calls_per_second": total / seconds,
        "restarts": restarts,
        "leaked_processes": len(_children()),
        "leaked_fds": max(0, len(os.listdir("/proc/self/fd")) - fds_before),
        "leaked_segments": _shm.stats().get("worker_fds", 0),  # descriptors the host still holds for workers
    }


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
    sys.exit(1 if counts["lost"] or counts["raw_zmq"] else 0)


if __name__ == "__main__":
    main()
