"""Call chains: recursion across processes, and host calls that come back to their own loop.

Run from the repository root:  .venv/bin/python examples/context/main.py
"""

import asyncio
import threading
from pathlib import Path

from services import LoopProbe

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


async def main() -> None:
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        relay = await manager.load_extension(
            ExtensionConfig(name="relay", module_path=HERE / "extensions" / "relay", apis=[LoopProbe]))

        # host -> extension -> host -> extension ... ten levels deep, each side awaiting the other.
        async def host_step(n):
            if n == 0:
                return ["host(0)"]
            return [f"host({n})", *await relay.recurse(n - 1, host_step)]

        trail = await host_step(10)
        print(f"{len(trail)} hops:", " -> ".join(trail[:5]), "-> ... ->", " -> ".join(trail[-3:]))

        # A second event loop, in another thread, calls the same extension. Callbacks it passes
        # and singleton calls made on its behalf run on *its* loop, not the manager's.
        side: dict[str, str] = {}

        def other_thread() -> None:
            async def run() -> None:
                async def where():
                    return threading.current_thread().name

                side["callback"] = await relay.call_back(where)
                side["LoopProbe"] = await relay.ask_probe()

            asyncio.run(run())

        thread = threading.Thread(target=other_thread, name="side-loop")
        thread.start()

        async def where():
            return threading.current_thread().name

        main_callback = await relay.call_back(where)
        main_probe = await relay.ask_probe()
        await asyncio.to_thread(thread.join)  # the manager's loop keeps running meanwhile
        print(f"chains from the main loop: callback ran in {main_callback!r}, LoopProbe.where() in {main_probe!r}")
        print(f"chains from the side loop: callback ran in {side['callback']!r}, "
              f"LoopProbe.where() in {side['LoopProbe']!r}")

if __name__ == "__main__":
    asyncio.run(main())
