"""Two extensions with conflicting numpy versions side by side, and a tensor shared with a third.

Run from the repository root:  .venv/bin/python examples/demo/main.py
"""

import asyncio
import time
from pathlib import Path

import torch

import pyisolate

HERE = Path(__file__).parent


def show(event: pyisolate.ProgressEvent) -> None:
    print(f"  [{event.extension:>12}] {event.step:<8} {event.elapsed:6.2f} s {event.detail}")


async def main() -> None:
    config = pyisolate.ExtensionManagerConfig(venv_root_path=HERE / "venvs", on_progress=show)
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        legacy = manager.load_extension(pyisolate.ExtensionConfig(
            name="legacy_numpy", module_path=HERE / "extensions" / "legacy_numpy", dependencies=["numpy<2"]))
        modern = manager.load_extension(pyisolate.ExtensionConfig(
            name="modern_numpy", module_path=HERE / "extensions" / "modern_numpy", dependencies=["numpy>=2"]))
        tools = manager.load_extension(pyisolate.ExtensionConfig(
            name="tensor_tools", module_path=HERE / "extensions" / "tensor_tools", share_torch=True))
        await asyncio.gather(legacy, modern, tools)  # the environments build in parallel

        for name, extension in (("legacy_numpy", legacy), ("modern_numpy", modern)):
            info = await extension.describe()
            print(f"{name:>12}: numpy {info['numpy']:<8} in {info['python']}")

        values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
        mean, std = await legacy.stats(values)
        print(f"legacy_numpy.stats     -> mean={mean:.3f} std={std:.3f}")
        print(f"modern_numpy.normalise -> {[round(v, 3) for v in await modern.normalise(values)]}")

        weights = torch.rand(1024, 1024)  # 4 MiB
        mean = await tools.centre(weights)
        print(f"tensor_tools (torch {await tools.torch_version()}, the host's own): centred a 4 MiB tensor "
              f"in place; mean was {mean:.3f}, the host now sees {float(weights.mean()):+.1e}")
        start = time.perf_counter()
        for _ in range(100):
            await tools.centre(weights)
        print(f"centring it again, already shared (compute included): {(time.perf_counter() - start) / 100 * 1e6:.0f} us a call")

        start = time.perf_counter()
        n = 1000
        for _ in range(n):
            await modern.describe()
        print(f"{n} round trips to modern_numpy: {(time.perf_counter() - start) / n * 1e6:.0f} us each")


if __name__ == "__main__":
    asyncio.run(main())
