"""A host in a process of its own, in which one extension tries to steal another's launch secret.

    python tests/boot_host.py VENV_ROOT

Run it as a user without privileges (tests/integration/test_boot_secret.py drops root's
capabilities): only then do the kernel's checks on /proc and ptrace apply to the spy. Prints
its findings as JSON on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyisolate  # noqa: E402

SNOOP = str(ROOT / "tests" / "extensions" / "snoop")


async def main(venv_root: str) -> None:
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root)
    async with asyncio.timeout(120), pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        snoop = await manager.load_extension(pyisolate.ExtensionConfig(name="snoop", module_path=SNOOP))
        secrets: dict[bytes, bytes] = {}
        registry = manager.broker.registry
        expect = registry.expect

        def recording_expect(name: bytes, secret: bytes, **how: bool) -> None:  # observes, changes nothing
            secrets[name] = secret
            expect(name, secret, **how)

        registry.expect = recording_expect  # type: ignore[method-assign]
        await snoop.start_watching(os.getpid(), "victim")
        await snoop.rounds(1)  # the spy is at work before the victim starts
        victim = await manager.load_extension(pyisolate.ExtensionConfig(name="victim", module_path=SNOOP))
        victim_pid = await victim.pid()
        await snoop.rounds(3)  # and keeps at it once the victim runs
        report = await snoop.stop_watching()
        secret = secrets[b"victim"].hex()
        print(json.dumps({
            **report,
            "joins": [outcome for _, outcome in report["joins"]],
            "victim_pid": victim_pid,
            "victim_dumpable": await victim.dumpable(),
            "snoop_dumpable": await snoop.dumpable(),
            "learned": await snoop.learned(secret),
            "uid": os.getuid(),
        }), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
