"""Real venvs with conflicting dependencies, side by side, and the seed README's quick start."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig
from tests.support import ext

pytestmark = pytest.mark.venv

QUICKSTART_EXTENSION = textwrap.dedent(
    """
    # extensions/my_extension/__init__.py
    from pyisolate import ExtensionBase

    class MyExtension(ExtensionBase):
        def on_module_loaded(self, module):
            self.module = module

        async def process_data(self, data):
            # This runs in an isolated process with its own dependencies
            import numpy as np  # This could be numpy 2.x
            return np.array(data).mean()
    """
)

QUICKSTART_MAIN = textwrap.dedent(
    """
    # main.py
    import pyisolate
    import asyncio

    async def main():
        # Configure the extension manager
        config = pyisolate.ExtensionManagerConfig(
            venv_root_path="./venvs"
        )
        manager = pyisolate.ExtensionManager(pyisolate.ExtensionBase, config)

        # Load an extension with specific dependencies
        extension = manager.load_extension(
            pyisolate.ExtensionConfig(
                name="data_processor",
                module_path="./extensions/my_extension",
                isolated=True,
                dependencies=["numpy>=2.0.0"]
            )
        )

        # Use the extension
        result = await extension.process_data([1, 2, 3, 4, 5])
        print(f"Mean: {result}")  # Mean: 3.0

        # Cleanup
        await extension.stop()

    asyncio.run(main())
    """
)


async def test_two_numpy_majors_side_by_side(venv_root):
    events = []
    config = ExtensionManagerConfig(venv_root_path=venv_root, on_progress=events.append)
    async with ExtensionManager(ExtensionBase, config) as manager:
        old = manager.load_extension(
            ExtensionConfig(name="numpy1", module_path=ext("numpy_probe"), dependencies=["numpy<2"])
        )
        new = manager.load_extension(
            ExtensionConfig(name="numpy2", module_path=ext("numpy_probe"), dependencies=["numpy>=2"])
        )
        async with asyncio.timeout(600):
            v1, v2 = await asyncio.gather(old.numpy_version(), new.numpy_version())
        assert v1.startswith("1.") and v2.startswith("2.")
        f1, f2 = await asyncio.gather(old.numpy_file(), new.numpy_file())
        assert f1.startswith(str(venv_root / "numpy1")) and f2.startswith(str(venv_root / "numpy2"))
        mean = await new.mean([1, 2, 3])
        assert mean == 2.0 and type(mean) is numpy.float64
        array = await old.array(6)
        assert array.dtype == numpy.float32 and array.shape == (3, 2)
        assert array.tolist() == [[0, 1], [2, 3], [4, 5]]
    for name, spec in (("numpy1", "numpy<2"), ("numpy2", "numpy>=2")):  # uv's steps, in order
        own = [e for e in events if e.extension == name]
        steps = [e.step for e in own]
        folded = [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step]
        assert folded in (["reused"], ["creating", "resolving", "downloading", "done"],
                          ["creating", "resolving", "downloading", "installing", "done"]), steps
        if folded != ["reused"]:  # built here, not kept from an earlier run
            assert (own[1].detail, own[2].packages, own[-1].packages) == (spec, 1, 1)


async def test_seed_readme_quick_start_pasted_as_is_prints_the_mean(tmp_path: Path):
    package = tmp_path / "extensions" / "my_extension"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(QUICKSTART_EXTENSION)
    (tmp_path / "main.py").write_text(QUICKSTART_MAIN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "main.py", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(600):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "Mean: 3.0", (out, err)
