"""A host run as an unprivileged user, whose one extension tries what a hostile plugin would.

    python nobody_host.py WORKDIR TCP_PORT UNIX_SOCKET

Run by tests/integration/test_sandbox_unprivileged.py as ``nobody`` with the system
interpreter's venv (real users are not root). WORKDIR holds the venv root, the extension and a
secret beside it, all owned by that user: only the sandbox keeps the extension from them.
WORKDIR/hostapp is a folder of the host
application the extension is given (``host_paths``): it may read it, never write it.
UNIX_SOCKET is a pathname socket this user may connect to (a session bus, say). The same
attacks are tried under each backend alone: Landlock (the default), then bwrap. Prints its
findings as JSON on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pyisolate


async def main(workdir: Path, port: int, unix_socket: str) -> dict[str, object]:
    found: dict[str, object] = {"uid": os.getuid()}
    config = pyisolate.ExtensionManagerConfig(venv_root_path=workdir / "venvs", sandbox_mode="required")
    extension = pyisolate.ExtensionConfig(name="sandboxed", module_path=workdir / "sandboxed",
                                          host_paths=[workdir / "hostapp"])  # fmt: skip
    async with asyncio.timeout(240), pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        worker = await manager.load_extension(extension)
        found.update(await _attacks(worker, workdir, "sandboxed", port))
        found["ptrace_host"] = await worker.ptrace(os.getpid())
        found["open_host_fd"] = await worker.open_fd(os.getpid(), 0)
        found["unix_socket"] = await worker.connect_unix(unix_socket)
        # Limits: no cgroup is writable by this user, so 'required' refuses them, naming the fix ...
        try:
            await manager.load_extension(pyisolate.ExtensionConfig(
                name="limited", module_path=workdir / "sandboxed", limits={"memory": "256MiB", "cpu": 0.5}))
            found["limits_required"] = "loaded"
        except pyisolate.ExtensionLoadError as exc:
            found["limits_required"] = str(exc)
    # ... and 'preferred' enforces what it can: memory through RLIMIT_DATA.
    preferred = pyisolate.ExtensionManagerConfig(venv_root_path=workdir / "venvs")
    async with asyncio.timeout(240), pyisolate.ExtensionManager(pyisolate.ExtensionBase, preferred) as manager:
        limited = await manager.load_extension(pyisolate.ExtensionConfig(
            name="limited", module_path=workdir / "sandboxed", limits={"memory": "256MiB"}))
        try:
            found["allocate_small"] = await limited.allocate(16)
            found["allocate_big"] = await limited.allocate(1024)
        except MemoryError as exc:
            found["allocate_big"] = f"MemoryError: {exc}"
    found["bwrap"] = await _under_bwrap(workdir, port, unix_socket)
    return found


async def _under_bwrap(workdir: Path, port: int, unix_socket: str) -> dict[str, object]:
    """The same attacks with bubblewrap alone (the bundled bwrap, run by this user)."""
    found: dict[str, object] = {}
    config = pyisolate.ExtensionManagerConfig(venv_root_path=workdir / "venvs", sandbox_mode="required",
                                              sandbox_backends=("bwrap",))  # fmt: skip
    extension = pyisolate.ExtensionConfig(name="boxed", module_path=workdir / "sandboxed",
                                          host_paths=[workdir / "hostapp"])  # fmt: skip
    async with asyncio.timeout(240), pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        worker = await manager.load_extension(extension)
        found.update(await _attacks(worker, workdir, "boxed", port))
        found["pids"] = await worker.pids()
        found["unix_socket"] = await worker.connect_unix(unix_socket)
        found["say"] = await worker.say("from the box")
    return found


async def _attacks(worker: Any, workdir: Path, name: str, port: int) -> dict[str, object]:
    """What every confined worker tries, whatever confines it: the host folder it was given
    (host_paths) read and written, a secret read, writes outside and into its own venv, a tcp
    connection, a signal to the host."""
    return {
        "status": await worker.status(),
        "host_read": await worker.read(str(workdir / "hostapp" / "hostapp_mod.py")),
        "host_write": await worker.write(str(workdir / "hostapp" / "planted.py")),
        "secret": await worker.read(str(workdir / "secret.txt")),
        "write_outside": await worker.write(str(workdir / "planted.txt")),
        "write_venv": await worker.write(str(workdir / "venvs" / name / "pyvenv.cfg"), "home = /evil"),
        "tcp": await worker.connect_tcp(port),
        "kill_host": await worker.kill(os.getpid(), 0),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))))
