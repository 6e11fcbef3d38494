"""What confinement costs: warm start and small calls of a sandboxed worker beside an unconfined one.

Measured in the same run, alternating, so the machine's noise falls on both: warm start (a new
manager, load, first answer) with ``sandbox_mode="disabled"`` and with each way of confining a
worker; and small calls to a confined and an unconfined extension of one manager (a manager
with ``sandbox_mode="disabled"`` lets an extension be stricter, never looser).

    python benchmarks/sandbox.py [--quick]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import pyisolate  # noqa: E402

IDLE_EXT = Path(__file__).resolve().parent / "idle_ext"


def bwrap_works() -> bool:
    """Whether bubblewrap can make a sandbox here (its rows are measured only then)."""
    from pyisolate._host import sandbox_offered

    offered = sandbox_offered()
    return bool(offered.get("bwrap")) and offered.get("bwrap_problem") is None
#: How a worker may be confined, by name: the manager settings that ask for it.
MODES: dict[str, dict[str, Any]] = {
    "unconfined": {"sandbox_mode": "disabled"},
    "landlock": {"sandbox_mode": "preferred"},  # Landlock, seccomp, dropped capabilities, where offered
}
if bwrap_works():
    MODES["bwrap"] = {"sandbox_mode": "preferred", "sandbox_backends": ("bwrap",)}
    MODES["landlock+bwrap"] = {"sandbox_mode": "preferred", "sandbox_backends": ("landlock", "bwrap")}


async def _first_answer(root: Path, settings: dict[str, Any]) -> float:
    config = pyisolate.ExtensionManagerConfig(venv_root_path=root, **settings)
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        start = time.perf_counter()
        await manager.load_extension(pyisolate.ExtensionConfig(name="sandbox-start", module_path=IDLE_EXT)).ping()
        return time.perf_counter() - start


async def measure(work: Path, quick: bool) -> list[common.Result]:
    root = work / "sandbox-venvs"
    root.mkdir(parents=True, exist_ok=True)
    results: list[common.Result] = []

    starts: dict[str, list[float]] = {mode: [] for mode in MODES}
    for settings in MODES.values():
        await _first_answer(root, settings)  # builds the venv, warms the caches
    for _ in range(3 if quick else 9):
        for mode, settings in MODES.items():
            starts[mode].append(await _first_answer(root, settings))
    base = common.median_p99(starts["unconfined"])[0]
    for mode in MODES:
        median = common.median_p99(starts[mode])[0]
        confined = mode != "unconfined"
        results.append(common.Result(
            f"sandbox.start.{mode}", "sandbox", f"warm start, {mode}", median * 1000, "ms",
            baseline="sandbox.start.unconfined" if confined else None, target=1.3 if confined else None,
            target_note="a confined warm start within about +50 ms (1.3x) of an unconfined one" if confined else "",
            samples=len(starts[mode]), extra={"over_unconfined_ms": round((median - base) * 1000, 1)},
        ))  # fmt: skip

    # One manager per way of confining (backends are the host's); the unconfined extension and
    # the confined ones are called in turns from the same loop.
    managers = [
        pyisolate.ExtensionManager(pyisolate.ExtensionBase, pyisolate.ExtensionManagerConfig(
            venv_root_path=root, sandbox_mode="disabled",
            sandbox_backends=settings.get("sandbox_backends", ("landlock",))))
        for settings in MODES.values()
    ]  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        exts = {}
        for manager, (mode, settings) in zip(managers, MODES.items()):
            await stack.enter_async_context(manager)
            exts[mode] = await manager.load_extension(pyisolate.ExtensionConfig(
                name=f"sandbox-call-{mode.replace('+', '-')}", module_path=IDLE_EXT,
                sandbox_mode=settings["sandbox_mode"]))  # fmt: skip
        block = 500 if quick else 2000
        calls: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(3 if quick else 6):
            for mode, ext in exts.items():
                calls[mode] += await common.time_calls(ext.ping, block, 50)
    for mode in MODES:
        median, p99 = common.median_p99(calls[mode])
        confined = mode != "unconfined"
        results.append(common.Result(
            f"sandbox.call.{mode}", "sandbox", f"small call, {mode}", median, "us", p99=p99,
            baseline="sandbox.call.unconfined" if confined else None, target=1.05 if confined else None,
            target_note="confinement costs nothing per call (<= 1.05x unconfined)" if confined else "",
            samples=len(calls[mode]),
        ))  # fmt: skip
    return results


if __name__ == "__main__":
    common.section_main(measure, __doc__, "pyisolate-bench-sandbox-")
