"""Events: extensions emit, the host's handlers receive, in order per sender.

Run from the repository root:  .venv/bin/python examples/events/main.py
"""

import asyncio
import logging
from pathlib import Path

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


class OneLine(logging.Handler):
    """Show pyisolate's log records on one line (a failing handler is logged, not raised)."""

    def emit(self, record):
        error = record.exc_info[1] if record.exc_info else None
        print(f"  [log] {record.getMessage()}: {error!r}")


async def main() -> None:
    logging.getLogger("pyisolate").addHandler(OneLine())
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        finished = asyncio.Queue()

        def on_progress(sender, value):  # a plain handler
            print(f"  {sender}: {value['done']}/{value['of']} {value['file']}")

        async def on_finished(sender, count):  # a coroutine handler
            await finished.put((sender, count))

        def on_anything(sender, event):  # "*" receives (name, value)
            name, value = event
            if name == "found":
                print(f"  {sender} found {value} (seen by the '*' handler)")

        manager.on_event("progress", on_progress)
        manager.on_event("finished", on_finished)
        manager.on_event("*", on_anything)

        path = HERE / "extensions" / "watcher"
        a, b = await asyncio.gather(
            manager.load_extension(ExtensionConfig(name="watcher_a", module_path=path)),
            manager.load_extension(ExtensionConfig(name="watcher_b", module_path=path)),
        )

        print("watcher_a.scan      ->", await a.scan(["a.txt", "b.txt", "c.txt"]))
        print("finished event      ->", await finished.get())
        print("watcher_b.scan_in_thread ->", await b.scan_in_thread(["x.png", "y.png"]))
        print("finished event      ->", await finished.get())

        await a.misbehave()  # on_progress raises on its value: logged, and the next event still arrives
        print("finished event      ->", await finished.get())


if __name__ == "__main__":
    asyncio.run(main())
