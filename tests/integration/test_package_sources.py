"""Package sources, for real: uv installs from folders of wheels and from PEP 503 indexes served on
127.0.0.1, CUDA wheels are chosen for the host's torch, and workers import what was installed.

No test reaches a remote host, except the share_torch one: its venv gets the host's numpy from the
default registry, as every share_torch venv does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pyisolate import ExtensionConfig
from pyisolate._envs.progress import ProgressEvent
from pyisolate._envs.venv import ensure_venv
from pyisolate._envs.wheels import IndexReadError, TorchBuild, cuda_requirements, read_index
from pyisolate._sources import CudaWheels, PackageSources
from pyisolate.errors import EnvironmentBuildError
from tests.package_index import LocalIndex, publish, write_wheel

pytestmark = pytest.mark.venv

DEADLINE = 120.0
PROBE = textwrap.dedent(
    """
    import importlib
    import importlib.metadata

    from pyisolate import ExtensionBase


    class Probe(ExtensionBase):
        def version(self, module):
            return importlib.import_module(module).VERSION

        def origin(self, module):
            return importlib.import_module(module).__file__

        def installed(self, distribution):
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                return None
    """
)


def _probe(tmp_path: Path) -> Path:
    """An extension that reports the modules and distributions its venv holds."""
    directory = tmp_path / "probe"
    directory.mkdir()
    (directory / "__init__.py").write_text(PROBE)
    return directory


def _empty_index(tmp_path: Path) -> str:
    """A file:// index with no projects: installs then use only what a test provides."""
    empty = tmp_path / "empty-index"
    empty.mkdir()
    return empty.as_uri()


def _host_torch() -> TorchBuild:
    torch = TorchBuild.of_host()
    assert torch is not None, "the test extra installs torch in the host"
    return torch


async def test_find_links_folder_installs_with_the_index_disabled(manager, tmp_path: Path) -> None:
    write_wheel(tmp_path / "wheels", "pyi-tiny", "1.2.3")
    config = ExtensionConfig(
        name="sources-links", module_path=_probe(tmp_path), dependencies=["pyi-tiny==1.2.3"],
        index_url=_empty_index(tmp_path), find_links=[tmp_path / "wheels"],
    )  # fmt: skip
    extension = manager.load_extension(config)
    async with asyncio.timeout(DEADLINE):
        assert await extension.version("pyi_tiny") == "1.2.3"
        origin = await extension.origin("pyi_tiny")
    assert origin.startswith(str(manager.config.venv_root / config.name))


async def test_local_index_as_index_url_and_as_extra_index_url(manager, tmp_path: Path) -> None:
    publish(tmp_path / "site" / "main", [write_wheel(tmp_path / "built", "pyi-main", "2.0")])
    publish(tmp_path / "site" / "extra", [write_wheel(tmp_path / "built", "pyi-extra", "3.1")])
    with LocalIndex(tmp_path / "site") as index:
        config = ExtensionConfig(
            name="sources-indexes", module_path=_probe(tmp_path),
            dependencies=["pyi-main>=2", "pyi-extra"],
            index_url=f"{index.url}/main/", extra_index_urls=[f"{index.url}/extra/"],
        )  # fmt: skip
        extension = manager.load_extension(config)
        async with asyncio.timeout(DEADLINE):
            assert await extension.version("pyi_main") == "2.0"
            assert await extension.version("pyi_extra") == "3.1"
        assert {"/main/pyi-main/", "/extra/pyi-extra/"} <= set(index.requests)


def _cuda_index(tmp_path: Path, torch: TorchBuild) -> tuple[Path, str]:
    """Wheels of one package for several torch and CUDA builds, and the label the host's fits.

    The fitting wheel declares a dependency that exists nowhere: only ``--no-deps`` installs it.
    """
    major, minor = torch.version.split(".")[:2]
    cuda = "cpu" if torch.cuda is None else "cu" + "".join(torch.cuda.split(".")[:2])
    other_cuda = "cu128" if torch.cuda is None else "cpu"
    built = tmp_path / "built"
    right = f"pt{major}{minor}{cuda}"
    wheels = [
        write_wheel(built, "pyi-cuda-ext", "1.0+" + right, requires=["pyi-no-such-package-xyz>=1"]),
        write_wheel(built, "pyi-cuda-ext", f"1.1+pt{major}{int(minor) - 1}{cuda}"),  # another torch
        write_wheel(built, "pyi-cuda-ext", f"1.1+pt{major}{minor}{other_cuda}"),  # another CUDA
        write_wheel(built, "pyi-cuda-ext", f"1.1+pt{major}{minor}{cuda}", tag="cp27-cp27m-win_amd64"),  # no Python 2
        write_wheel(built, "pyi-cuda-ext", f"0.9+torch{major}.{minor}{cuda}"),  # fits, but older
        write_wheel(built, "pyi-cuda-ext", "1.0"),  # fits, names no torch
    ]
    publish(tmp_path / "site" / "cuda", wheels)
    return tmp_path / "site", "1.0+" + right


async def test_cuda_wheels_choose_the_wheel_built_for_the_host_torch(manager, tmp_path: Path) -> None:
    site, expected = _cuda_index(tmp_path, _host_torch())
    # Another dependency needs the CUDA package: the main pass leaves it to the CUDA wheel pass.
    write_wheel(tmp_path / "wheels", "pyi-uses-cuda", "1.0", requires=["pyi-cuda-ext"])
    with LocalIndex(site) as index:
        config = ExtensionConfig(
            name="sources-cuda", module_path=_probe(tmp_path), dependencies=["pyi-cuda-ext>=0.9", "pyi-uses-cuda"],
            index_url=_empty_index(tmp_path), find_links=[tmp_path / "wheels"],
            cuda_wheels={"index_url": f"{index.url}/cuda/", "packages": ["pyi-cuda-ext"]},
        )  # fmt: skip
        extension = manager.load_extension(config)
        async with asyncio.timeout(DEADLINE):
            assert await extension.version("pyi_cuda_ext") == expected
            assert await extension.version("pyi_uses_cuda") == "1.0"
            assert await extension.installed("pyi-no-such-package-xyz") is None  # installed with --no-deps
        assert "/cuda/pyi-cuda-ext/" in index.requests


async def test_cuda_wheels_package_map_and_index_urls(tmp_path: Path) -> None:
    site, expected = _cuda_index(tmp_path, _host_torch())
    publish(site / "other", [write_wheel(tmp_path / "built", "pyi-unrelated", "1.0")])
    cuda = CudaWheels.parse({"index_urls": [(site / "other").as_uri(), (site / "cuda").as_uri()],
                             "packages": ["cuda-ext"], "package_map": {"cuda-ext": "pyi_cuda_ext"}}, "cuda_wheels")
    async with asyncio.timeout(DEADLINE):
        chosen = await cuda_requirements(["cuda-ext>=1; python_version >= '3'"], cuda, extension="x")
    wheel = site / "files" / f"pyi_cuda_ext-{expected}-py3-none-any.whl"
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert chosen == [(f"pyi-cuda-ext @ {(site / 'files').as_uri()}/{wheel.name}#sha256={digest}", wheel.name)]


async def test_an_index_that_needs_credentials_gets_them_and_never_shows_them(tmp_path: Path) -> None:
    site, expected = _cuda_index(tmp_path, _host_torch())
    events: list[ProgressEvent] = []
    with LocalIndex(site, credentials=("me", "s3cret")) as index:
        assert "me:s3cret@" in index.url
        sources = PackageSources(cuda_wheels=CudaWheels.parse(
            {"index_url": f"{index.url}/cuda/", "packages": ["pyi-cuda-ext"]}, "cuda_wheels"))
        async with asyncio.timeout(DEADLINE):
            python = await ensure_venv(venv_root=tmp_path / "venvs", name="auth", dependencies=["pyi-cuda-ext"],
                                       sources=sources, progress=events.append)  # fmt: skip
        assert {"/cuda/pyi-cuda-ext/", f"/files/pyi_cuda_ext-{expected}-py3-none-any.whl"} <= set(index.requests)
    site_packages = next((python.parent.parent / "lib").glob("python*/site-packages"))
    assert (site_packages / "pyi_cuda_ext.py").read_text() == f"VERSION = {expected!r}\n"
    assert f"pyi_cuda_ext-{expected}-py3-none-any.whl" in " ".join(event.detail for event in events)
    assert all("s3cret" not in event.detail for event in events)

    with LocalIndex(site, credentials=("me", "s3cret")) as index:  # a wrong password: refused, and not shown
        wrong = index.url.replace("s3cret", "wrong-pw")
        cuda = CudaWheels.parse({"index_url": f"{wrong}/cuda/", "packages": ["pyi-cuda-ext"]}, "cuda_wheels")
        with pytest.raises(EnvironmentBuildError, match=r"answered HTTP 401") as info:
            async with asyncio.timeout(DEADLINE):
                await cuda_requirements(["pyi-cuda-ext"], cuda, extension="x")
    assert "wrong-pw" not in str(info.value) and "me:***@127.0.0.1" in str(info.value)


async def test_cuda_wheels_without_a_fitting_wheel_fail_listing_what_was_seen(manager, tmp_path: Path) -> None:
    torch = _host_torch()
    major, minor = torch.version.split(".")[:2]
    other_cuda = "cu128" if torch.cuda is None else "cpu"
    wheels = [write_wheel(tmp_path / "built", "pyi-cuda-ext", f"1.0+pt{major}{minor}{other_cuda}"),
              write_wheel(tmp_path / "built", "pyi-cuda-ext", "1.0+pt19cpu")]  # fmt: skip
    publish(tmp_path / "site" / "cuda", wheels)
    with LocalIndex(tmp_path / "site") as index:
        config = ExtensionConfig(
            name="sources-nocuda", module_path=_probe(tmp_path), dependencies=["pyi-cuda-ext"],
            cuda_wheels={"index_url": f"{index.url}/cuda/", "packages": ["pyi-cuda-ext"]},
        )  # fmt: skip
        extension = manager.load_extension(config)
        with pytest.raises(EnvironmentBuildError) as info:
            async with asyncio.timeout(DEADLINE):
                await extension
    message = str(info.value)
    assert info.value.packages == ["pyi-cuda-ext"]
    for wheel in wheels:
        assert wheel.name in message
    assert f"torch {torch.version}" in message and f"pt{major}{minor}" in message
    assert ("CPU only" if torch.cuda is None else f"CUDA {torch.cuda}") in message
    assert not (manager.config.venv_root / config.name).exists()  # the half-built venv is gone


async def test_share_torch_no_deps_installs_without_dependencies(manager, tmp_path: Path) -> None:
    write_wheel(tmp_path / "wheels", "pyi-needy", "0.1", requires=["pyi-no-such-package-xyz>=1"])
    sources = PackageSources(index_url=_empty_index(tmp_path), find_links=(str(tmp_path / "wheels"),))
    with pytest.raises(EnvironmentBuildError) as info:  # with its dependencies, it cannot be installed
        async with asyncio.timeout(DEADLINE):
            await ensure_venv(venv_root=tmp_path / "venvs", name="needy", dependencies=["pyi-needy"], sources=sources)
    assert "pyi-no-such-package-xyz" in info.value.output_tail

    config = ExtensionConfig(
        name="sources-nodeps", module_path=_probe(tmp_path), dependencies=["pyi-needy==0.1"],
        share_torch=True, share_torch_no_deps=["pyi-needy"], find_links=[tmp_path / "wheels"],
    )  # fmt: skip
    extension = manager.load_extension(config)
    async with asyncio.timeout(DEADLINE):
        assert await extension.version("pyi_needy") == "0.1"
        assert await extension.installed("pyi-no-such-package-xyz") is None


async def test_sources_decide_when_a_venv_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_wheel(tmp_path / "a", "pyi-tiny", "1.0")
    write_wheel(tmp_path / "b", "pyi-tiny", "2.0")
    publish(tmp_path / "site" / "simple", [write_wheel(tmp_path / "built", "pyi-other", "1.0")])
    empty = _empty_index(tmp_path)
    events: list[ProgressEvent] = []

    async def build(sources: PackageSources) -> list[str]:
        events.clear()
        async with asyncio.timeout(DEADLINE):
            await ensure_venv(venv_root=tmp_path / "venvs", name="ext", dependencies=["pyi-tiny"], sources=sources,
                              progress=events.append)  # fmt: skip
        return [event.step for event in events]

    def version() -> str:
        return (next((tmp_path / "venvs" / "ext").glob("lib/python*/site-packages/pyi_tiny.py"))).read_text()

    first = PackageSources(index_url=empty, find_links=(str(tmp_path / "a"),))
    assert (await build(first))[-1] == "done" and "1.0" in version()
    other_links = PackageSources(index_url=empty, find_links=(str(tmp_path / "b"),))
    assert (await build(other_links))[-1] == "done" and "2.0" in version()
    with LocalIndex(tmp_path / "site") as index:
        extra = PackageSources(index_url=empty, find_links=(str(tmp_path / "b"),),
                               extra_index_urls=(f"{index.url}/simple/",))  # fmt: skip
        assert (await build(extra))[0] == "creating"
        assert "/simple/pyi-tiny/" in index.requests  # uv asked the extra index too

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("reusing a venv must not start a subprocess")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_subprocess)
    assert await build(extra) == ["reused"]


async def test_an_index_that_does_not_answer_fails_within_the_deadline(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple/"
        cuda = CudaWheels.parse({"index_url": url, "packages": ["pyi-cuda-ext"]}, "cuda_wheels")
        with pytest.raises(EnvironmentBuildError, match="took longer than 1 s; check that the index is reachable"):
            async with asyncio.timeout(DEADLINE):
                await cuda_requirements(["pyi-cuda-ext"], cuda, extension="x", timeout=1.0)


def test_read_index_over_http(tmp_path: Path) -> None:
    publish(tmp_path / "site" / "simple", [write_wheel(tmp_path / "built", "pyi-tiny", "1.0")])
    with LocalIndex(tmp_path / "site") as index:
        links = read_index(f"{index.url}/simple", "PYI_Tiny", timeout=10)
        assert [link.filename for link in links] == ["pyi_tiny-1.0-py3-none-any.whl"]
        assert links[0].url.startswith(f"{index.url}/files/pyi_tiny-1.0-py3-none-any.whl#sha256=")
        assert read_index(f"{index.url}/simple", "pyi-absent", timeout=10) == []  # a 404: no such project
    with pytest.raises(IndexReadError, match=r"cannot read http://127\.0\.0\.1:.*; check the index's address"):
        read_index(f"{index.url}/simple", "pyi-tiny", timeout=10)  # the server is gone


def test_cli_builds_lists_and_repairs_from_the_manifests_sources(tmp_path: Path) -> None:
    directory = tmp_path / "extensions" / "offline"
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text("")
    write_wheel(directory / "vendor", "pyi-tiny", "1.4")
    (directory / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "offline"
        dependencies = ["pyi-tiny"]

        [tool.pyisolate]
        index_url = "{_empty_index(tmp_path)}"
        find_links = ["vendor"]
        """))  # fmt: skip
    root = tmp_path / "venvs"

    def cli(*args: str | Path) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "pyisolate", *map(str, args), "--venv-root", str(root), "--json"],
                              capture_output=True, text=True, timeout=DEADLINE, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    assert cli("env", "build", directory)["extensions"][0]["status"] == "built"
    (listed,) = cli("env", "list")["venvs"]
    assert (listed["name"], listed["status"]) == ("offline", "ready")  # the recorded sources are in its fingerprint
    assert cli("env", "repair", "offline")["extensions"][0]["status"] == "built"  # by name: from what it recorded
    assert cli("env", "build", directory)["extensions"][0]["status"] == "reused"
    site_packages = next((root / "offline").glob("lib/python*/site-packages"))
    assert (site_packages / "pyi_tiny.py").read_text() == "VERSION = '1.4'\n"
