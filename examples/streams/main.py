"""Streams: async generator methods of an extension, consumed with `async for`.

Run from the repository root:  .venv/bin/python examples/streams/main.py
"""

import asyncio
import contextlib
from pathlib import Path

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


async def main() -> None:
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        feed = await manager.load_extension(ExtensionConfig(name="feed", module_path=HERE / "extensions" / "feed"))

        # No await needed: the call itself is async-iterable.
        print("count(5)            ->", [i async for i in feed.count(5)])
        # Awaiting the call gives the stream object.
        stream = await feed.count(3)
        print(f"await count(3)      -> {type(stream).__name__}: {[i async for i in stream]}")

        # Flow control: a slow consumer holds the producer back to a window of 16 items.
        async with contextlib.aclosing(feed.ticker()) as ticks:
            async for tick in ticks:
                await asyncio.sleep(0.005)  # a slow consumer
                if tick == 40:
                    produced = await feed.produced_so_far()
                    print(f"ticker              -> consumer took 40 items, producer has made {produced}")
                    break
        # Leaving aclosing() closes the remote generator: its `finally` ran.
        print("ticker closed       ->", await feed.wait_closed())

        # An error raised in the generator is raised in the consumer, after the items before it.
        items = []
        try:
            async for item in feed.broken():
                items.append(item)
        except ValueError as exc:
            print(f"broken()            -> got {items}, then ValueError: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
