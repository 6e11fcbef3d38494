"""The synchronous facades: a host without asyncio, and blocking calls from threads.

Run from the repository root:  .venv/bin/python examples/sync/main.py
"""

import asyncio
import threading
from pathlib import Path

import pyisolate
from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig, SyncExtensionManager

HERE = Path(__file__).parent
CONFIG = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
CALC = ExtensionConfig(name="calc", module_path=HERE / "extensions" / "calc")


def sync_host() -> None:
    """A plain script: no asyncio anywhere, every call returns its value."""
    print("-- SyncExtensionManager in a plain script")
    with SyncExtensionManager(ExtensionBase, CONFIG) as manager:
        manager.on_event("log", lambda sender, value: print(f"   event from {sender}: {value}"))
        calc = manager.load_extension(CALC)  # returns once the extension is ready
        print("calc.add(2, 3)               ->", calc.add(2, 3))
        print("get_actor('calc').add(4, 5)  ->", manager.get_actor("calc").add(4, 5))
        print("calc.apply_async(lambda)     ->", calc.apply_async(lambda x: x * 10, 4))
        print("calc.apply_blocking(lambda)  ->", calc.apply_blocking(lambda x: x * 100, 4))
        try:
            calc.divide(1, 0)
        except ZeroDivisionError as exc:
            print("calc.divide(1, 0)            -> ZeroDivisionError:", exc)


async def async_host() -> None:
    """An async host uses ExtensionManager; pyisolate.sync() serves its threads."""
    print("-- ExtensionManager with pyisolate.sync() in a thread")
    async with ExtensionManager(ExtensionBase, CONFIG) as manager:
        calc = await manager.load_extension(CALC)

        def worker_thread() -> str:
            return f"{pyisolate.sync(calc).add(20, 22)} (in {threading.current_thread().name})"

        print("sync(calc).add in a thread   ->", await asyncio.to_thread(worker_thread))
        try:
            pyisolate.sync(calc).add(1, 1)  # on the loop itself: refused, it would deadlock
        except RuntimeError as exc:
            print("sync(calc).add on the loop   -> RuntimeError:", exc)
        print("sync(callback) in ext coroutine ->", await calc.try_sync_in_coroutine(lambda x: x))

        # SyncExtensionManager inside a running loop is refused the same way.
        sync_manager = await asyncio.to_thread(SyncExtensionManager, ExtensionBase, CONFIG)
        try:
            sync_manager.load_extension(CALC)
        except RuntimeError as exc:
            print("SyncExtensionManager in a loop -> RuntimeError:", str(exc).split(";")[0])
        finally:
            await asyncio.to_thread(sync_manager.stop_all)


if __name__ == "__main__":
    sync_host()
    asyncio.run(async_host())
