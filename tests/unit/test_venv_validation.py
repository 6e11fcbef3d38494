"""Validation of extension names and dependency specs, and the venv fingerprint (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyisolate._envs import uv as _uv
from pyisolate._envs import venv as _venv
from pyisolate._envs.venv import venv_dir
from pyisolate._validate import validate_dependencies, validate_extension_name
from pyisolate.errors import ConfigError


@pytest.mark.parametrize("name", ["a", "ext1", "My_Ext-2.0", "x" * 64, "9lives", "hosted", "a.b"])
def test_good_names_pass(name: str) -> None:
    assert validate_extension_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "..", "a..b", ".hidden", "-opt", "_x", "host", "x" * 65, "a b", "a\n"]
    + ["é", "/abs"],
)
def test_bad_names_are_refused_with_the_value(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_extension_name(name)
    assert repr(name) in str(info.value)


def test_name_must_be_a_string() -> None:
    with pytest.raises(ConfigError):
        validate_extension_name(42)  # type: ignore[arg-type]


def test_venv_dir_is_inside_root(tmp_path: Path) -> None:
    assert venv_dir(tmp_path, "ext") == tmp_path / "ext"


def test_venv_dir_refuses_escape(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        venv_dir(tmp_path, "../x")


def test_venv_dir_refuses_symlink_leaving_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ext").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        venv_dir(root, "ext")


@pytest.mark.parametrize(
    "spec",
    [
        "numpy",
        "numpy<2",
        "numpy>=1.24,<2",
        "numpy; python_version>='3.8'",
        'requests[socks]~=2.31 ; sys_platform == "linux"',
        "pkg!=1.0.*",
        "Six==1.16.0",
    ],
)
def test_good_dependencies_pass(spec: str) -> None:
    assert validate_dependencies([spec]) == (spec,)


def test_dependencies_are_stripped_and_order_kept() -> None:
    assert validate_dependencies(["  b==1 ", "a\t"]) == ("b==1", "a")


@pytest.mark.parametrize(
    "spec",
    [
        "--index-url=https://evil.example/simple",
        "-e .",
        "numpy`id`",
        "numpy$(id)",
        "numpy|cat",
        "numpy&&true",
        "numpy\\",
        "numpy{1}",
        "numpy\n--extra-index-url x",
        "numpy\r",
        "numpy\x00",
        "",
        "   ",
        "numpy===",
        "not a requirement!",
    ],
)
def test_bad_dependencies_are_refused_with_the_value(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_dependencies([spec])
    assert repr(spec) in str(info.value)


def test_leading_dash_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="uv option"):
        validate_dependencies(["--pre"])


def test_non_string_item_is_refused() -> None:
    with pytest.raises(ConfigError, match="int"):
        validate_dependencies([3])  # type: ignore[list-item]


def test_a_bare_string_is_not_a_list() -> None:
    with pytest.raises(ConfigError, match="list"):
        validate_dependencies("numpy")


@pytest.mark.parametrize(
    "spec",
    [
        "mypkg @ https://example.com/mypkg-1.0.tar.gz",
        "https://example.com/x.whl",
        "./local/pkg",
        "/abs/pkg",
        "six-1.16.0-py2.py3-none-any.whl",  # a valid name, but uv reads it as a file
        "pkg.tar.gz",
    ],
)
def test_direct_references_refused_by_default(spec: str) -> None:
    with pytest.raises(ConfigError, match="allow_direct_references") as info:
        validate_dependencies([spec])
    assert repr(spec) in str(info.value)


def test_direct_references_allowed_on_request(tmp_path: Path) -> None:
    local = tmp_path / "pkg"
    local.mkdir()
    archive = tmp_path / "pkg-1.0.tar.gz"
    archive.write_bytes(b"")
    specs = ["mypkg @ https://example.com/mypkg-1.0.tar.gz", str(local), str(archive)]
    assert validate_dependencies(specs, allow_direct_references=True) == tuple(specs)


def test_missing_local_path_refused_even_when_allowed(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no such local path"):
        validate_dependencies([missing], allow_direct_references=True)


def test_torch_is_not_special_cased() -> None:
    assert validate_dependencies(["torch==2.13.0"]) == ("torch==2.13.0",)


def test_fingerprint_follows_what_decides_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in _venv._CONTENT_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    base = _venv._fingerprint(["six==1.16.0"], share_torch=False)
    assert len(base) == 64
    assert _venv._fingerprint(["six==1.16.0"], share_torch=False) == base
    assert _venv._fingerprint(["six==1.17.0"], share_torch=False) != base
    assert _venv._fingerprint([], share_torch=False) != base
    assert _venv._fingerprint(["six==1.16.0"], share_torch=True) != base
    two = _venv._fingerprint(["a", "b"], share_torch=False)
    assert _venv._fingerprint(["b", "a"], share_torch=False) != two
    monkeypatch.setenv("UV_INDEX_URL", "https://mirror.example/simple")
    assert _venv._fingerprint(["six==1.16.0"], share_torch=False) != base


def test_install_command_excludes_torch_only_when_shared(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    plain = _uv.install_command(python, ["six"], None)
    assert plain[1:] == ["pip", "install", "--python", str(python), "--no-config", "--color", "never", "six"]
    excludes = tmp_path / "excludes.txt"
    shared = _uv.install_command(python, ["six"], excludes)
    assert shared[-3:] == ["--excludes", str(excludes), "six"]


def test_packages_at_fault_found_in_output() -> None:
    deps = ["six==1.16.0", "Foo_Bar>=1"]
    output = "error: no matching distribution for foo-bar>=1"
    assert _uv.packages_at_fault(deps, output) == ["Foo_Bar>=1"]
    assert _uv.packages_at_fault(deps, "network down") == deps
    assert _uv.packages_at_fault(["six"], "sixty things") == ["six"]  # falls back to all


def test_packages_at_fault_not_fooled_by_prefix() -> None:
    deps = ["six", "sixer"]
    assert _uv.packages_at_fault(deps, "Because sixer was not found") == ["sixer"]
