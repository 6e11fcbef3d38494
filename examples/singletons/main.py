"""ProxiedSingleton: one service object in the host, shared by every extension.

Run from the repository root:  .venv/bin/python examples/singletons/main.py
"""

import asyncio
import os
import time
from pathlib import Path

from services import DatabaseAPI  # this script's folder is on sys.path

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


async def main() -> None:
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        writer = manager.load_extension(
            ExtensionConfig(name="writer", module_path=HERE / "extensions" / "writer", apis=[DatabaseAPI]))
        reader = manager.load_extension(
            ExtensionConfig(name="reader", module_path=HERE / "extensions" / "reader", apis=[DatabaseAPI]))
        local = manager.load_extension(ExtensionConfig(
            name="reader_local", module_path=HERE / "extensions" / "reader", apis=[DatabaseAPI], isolated=False))
        await asyncio.gather(writer, reader, local)

        print(await writer.save("colour", "blue"))
        print(await writer.save("size", 3))
        print("reader.lookup('colour')          ->", await reader.lookup("colour"))
        print("reader.lookup_blocking('size')   ->", await reader.lookup_blocking("size"))
        print("reader.all_keys()                ->", await reader.all_keys())
        print("the host's own instance holds    ->", DatabaseAPI().data)

        kind, pid = await reader.what_is_it()
        print(f"in 'reader' DatabaseAPI() is a {kind}; its methods ran in pid {pid} (host pid {os.getpid()})")
        kind, pid = await local.what_is_it()
        print(f"in 'reader_local' (isolated=False) DatabaseAPI() is the real {kind}")

        # A slow plain host method runs in a thread pool: other calls go on meanwhile.
        start = time.perf_counter()
        slow = asyncio.ensure_future(writer.slow_report(1.0))
        await asyncio.sleep(0.1)
        await writer.save("during", True)
        print(f"a save during the slow report finished after {time.perf_counter() - start:.2f} s")
        print(await slow, f"(finished after {time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    asyncio.run(main())
