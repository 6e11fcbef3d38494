"""Smoke call through an installed wheel (run by .ci/run from outside the repository)."""

import asyncio
import sys
from pathlib import Path

import pyisolate


async def main(extension_dir: str, venv_root: str) -> None:
    assert "site-packages" in pyisolate.__file__, f"not the installed wheel: {pyisolate.__file__}"
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root)
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        extension = await manager.load_extension(pyisolate.ExtensionConfig(name="smoke", module_path=extension_dir))
        mean = await extension.process_data([1, 2, 3, 4, 5])
        assert mean == 3.0, mean
        runtime = Path(await extension.module_file("pyisolate"))
    try:  # this venv has no torch: share_torch must say so, clearly
        pyisolate.ExtensionConfig(name="t", module_path=extension_dir, share_torch=True)
    except pyisolate.ConfigError as exc:
        assert "torch is not installed" in str(exc), exc
    else:
        raise AssertionError("share_torch=True without torch was accepted")
    print(f"wheel smoke: ok (mean {mean}, child imported {runtime}, share_torch refused without torch)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
