"""Worker output in the host's logging, and environment builds on a progress display.

Run from the repository root:  .venv/bin/python examples/logging/main.py
"""

import asyncio
import logging
import sys
from pathlib import Path

import pyisolate
from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

HERE = Path(__file__).parent


async def main() -> None:
    # The application configures logging, never the library. `extension` is set on every
    # record that comes from a worker; `defaults` covers the host's own records.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)-7s %(name)s [%(extension)s] %(message)s",
                                           defaults={"extension": "host"}))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    # One line per extension on a terminal, plain lines in a log; builds only (a reused
    # venv shows "up to date").
    with pyisolate.ProgressDisplay(stream=sys.stderr) as display:
        config = ExtensionManagerConfig(venv_root_path=HERE / "venvs", on_progress=display)
        async with ExtensionManager(ExtensionBase, config) as manager:
            talker = await manager.load_extension(
                ExtensionConfig(name="talker", module_path=HERE / "extensions" / "talker"))
            print("talker.work([1, 2, 3]) ->", await talker.work([1, 2, 3]))
        # Leaving the manager stopped the worker after reading the last of its output:
        # every line above is in the log by now.


if __name__ == "__main__":
    asyncio.run(main())
