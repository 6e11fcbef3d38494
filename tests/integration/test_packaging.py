"""One distribution, one import namespace: only ``pyisolate`` is installed at top level."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.support import ext

ROOT = Path(__file__).resolve().parents[2]

APP_HOST = textwrap.dedent(
    """
    import asyncio, sys
    import broker, workers  # the application's own top-level packages
    import pyisolate

    async def main():
        config = pyisolate.ExtensionManagerConfig(venv_root_path=sys.argv[1])
        async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
            extension = await manager.load_extension(
                pyisolate.ExtensionConfig(name="ok", module_path=sys.argv[2]))
            print(await extension.echo("called"), broker.WHO, workers.WHO)

    asyncio.run(main())
    """
)


async def test_application_with_its_own_workers_and_broker_packages(venv_root, tmp_path):
    for name in ("workers", "broker"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'app-{name}'\n")
    (tmp_path / "host.py").write_text(APP_HOST)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "host.py", str(venv_root), ext("ok"), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(180):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["called", "app-broker", "app-workers"]


def test_wheel_installs_only_the_pyisolate_namespace(tmp_path):
    source = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pyisolate", "broker", "workers"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"wheel build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (wheel,) = tmp_path.glob("pyisolate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pyisolate"}
    # Every module of the source tree, subpackages included (a room missing from pyproject's
    # packages list would be left out of the wheel).
    sources = {f"pyisolate/{p.relative_to(ROOT / 'pyisolate').as_posix()}" for p in (ROOT / "pyisolate").rglob("*.py")}
    for sub in ("broker", "workers"):
        sources |= {f"pyisolate/{sub}/{p.relative_to(ROOT / sub).as_posix()}" for p in (ROOT / sub).rglob("*.py")}
    assert sources - set(names) == set()
    assert "pyisolate/py.typed" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]\npyisolate = pyisolate._cli.main:main" in declared, declared
