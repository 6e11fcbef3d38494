"""Callables travel as references and run in the process (and on the loop) that defined them.

Run from the repository root:  .venv/bin/python examples/callbacks/main.py
"""

import asyncio
import gc
import os
import weakref
from pathlib import Path

from pyisolate import EncodeError, ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return x * self.factor


async def main() -> None:
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        tools = manager.load_extension(ExtensionConfig(name="tools", module_path=HERE / "extensions" / "tools"))
        other = manager.load_extension(ExtensionConfig(name="other", module_path=HERE / "extensions" / "tools"))
        await asyncio.gather(tools, other)

        def square(x):  # a plain function: runs in a thread pool of the host
            return x * x

        async def host_pid(_):  # a coroutine function: runs on the host's loop
            return os.getpid()

        print("function       ->", await tools.apply(square, [1, 2, 3]))
        print("bound method   ->", await tools.apply(Scaler(10).scale, [1, 2, 3]))
        print("lambda         ->", await tools.apply(lambda x: -x, [1, 2, 3]))
        print("coroutine fn   ->", await tools.apply(host_pid, [0]), f"(host pid {os.getpid()})")

        # A callable the extension keeps: alive while it holds it, released when it drops it.
        def on_progress(step, total):
            print(f"  progress {step}/{total} (printed by pid {os.getpid()})")

        alive = weakref.ref(on_progress)
        await tools.subscribe(on_progress)
        del on_progress
        print(await tools.run_job(3))
        await tools.unsubscribe()
        await tools.ping()  # the extension's RELEASE travels ahead of this answer
        gc.collect()
        print("host callback released after unsubscribe:", alive() is None)

        # A callable coming back from the extension: await its calls; it runs in the extension.
        triple = await tools.make_multiplier(3)
        print("triple(7)      ->", await triple(7), f"({triple!r})")
        print("passed back to 'tools', it is the original lambda:", await tools.is_original(triple))
        try:
            await other.apply(triple, [1])
        except EncodeError as exc:
            print("passed on to 'other' -> EncodeError:", exc)


if __name__ == "__main__":
    asyncio.run(main())
