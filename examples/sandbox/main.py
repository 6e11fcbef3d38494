"""Sandbox: a worker reads and writes only what the host grants, and reaches no network.

Run from the repository root:  .venv/bin/python examples/sandbox/main.py
"""

import asyncio
import os
import socket
import tempfile
from pathlib import Path

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


async def main() -> None:
    with tempfile.TemporaryDirectory() as app, socket.create_server(("127.0.0.1", 0)) as server:
        secret = Path(app) / "api_key.txt"  # beside the app: nobody granted it
        secret.write_text("sk-not-for-plugins")
        outputs = Path(app) / "outputs"
        outputs.mkdir()
        config = ExtensionManagerConfig(
            venv_root_path=HERE / "venvs",
            sandbox={"network": False, "writable_paths": [str(outputs)]},  # the host's policy
            limits={"memory": "1GiB", "open_files": 1024},
        )
        async with ExtensionManager(ExtensionBase, config) as manager:
            curious = ExtensionConfig(name="curious", module_path=HERE / "extensions" / "curious")
            pack = await manager.load_extension(curious)
            print("read the app's secret   ->", await pack.read(str(secret)))
            print("write into outputs/     ->", await pack.write(str(outputs / "image.txt"), "pixels"))
            print("write beside the app    ->", await pack.write(str(Path(app) / "planted.py"), "import os"))
            print("connect to 127.0.0.1    ->", await pack.phone_home(server.getsockname()[1]))
            print("signal the host         ->", await pack.signal_host(os.getpid()))
            print("its own temp dir        ->", await pack.scratch())
        print("outputs/image.txt holds ->", (outputs / "image.txt").read_text())


if __name__ == "__main__":
    asyncio.run(main())
