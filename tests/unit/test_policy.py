"""The sandbox policy and limits as users write them: parsing, errors, and narrowing only."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyisolate import ConfigError, ExtensionConfig, ExtensionManagerConfig, Limits, SandboxPolicy
from pyisolate._host.sandbox import resolve


def _ext(tmp_path: Path, **kw: object) -> ExtensionConfig:
    (tmp_path / "ext").mkdir(exist_ok=True)
    (tmp_path / "ext" / "__init__.py").write_text("")
    return ExtensionConfig(name="ext", module_path=tmp_path / "ext", **kw)  # type: ignore[arg-type]


def _host(tmp_path: Path, **kw: object) -> ExtensionManagerConfig:
    return ExtensionManagerConfig(venv_root_path=tmp_path / "venvs", **kw)  # type: ignore[arg-type]


def test_the_default_policy_is_preferred_confinement_without_network(tmp_path: Path) -> None:
    resolved = resolve(_ext(tmp_path), _host(tmp_path))
    assert resolved.mode == "preferred"
    assert resolved.policy == SandboxPolicy(network=False)
    assert resolved.limits == Limits()


def test_upstream_spellings_are_accepted_as_mappings(tmp_path: Path) -> None:
    config = _ext(tmp_path, sandbox_mode="required",
                  sandbox={"network": False, "writable_paths": ["/data/outputs"], "readonly_paths": ["/data/models"]},
                  limits={"memory": "4GiB", "cpu": 1.5, "processes": 64, "open_files": 1024})  # fmt: skip
    assert config.sandbox == SandboxPolicy(writable_paths=(Path("/data/outputs"),),
                                           readonly_paths=(Path("/data/models"),))
    assert config.limits == Limits(memory=4 << 30, cpu=1.5, processes=64, open_files=1024)
    assert config.limits.describe() == "memory 4 GiB, cpu 1.5, processes 64, open files 1024"


@pytest.mark.parametrize(
    ("size", "expected"),
    [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("2G", 2 << 30), ("1.5GB", 1_500_000_000), (64 << 20, 64 << 20)],
)  # fmt: skip
def test_memory_sizes(size: object, expected: int) -> None:
    assert Limits(memory=size).memory == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"sandbox": {"netwrk": False}}, ["unknown key 'netwrk'", "did you mean 'network'"]),
        ({"sandbox": {"network": "no"}}, ["network must be True or False"]),
        ({"sandbox": {"writable_paths": "/data"}}, ["writable_paths must be a list", "['/data']"]),
        ({"sandbox": {"readonly_paths": ["models"]}}, ["relative", "absolute path"]),
        ({"sandbox": {"readonly_paths": {"/a": "/b"}}}, ["maps paths", "list them, e.g. ['/a']"]),
        ({"sandbox": True}, ["SandboxPolicy or a mapping"]),
        ({"limits": {"memory": "4 gigs"}}, ["ExtensionConfig.limits", "memory", "'4GiB'"]),
        ({"limits": {"mem": "1GiB"}}, ["unknown limit 'mem'", "did you mean 'memory'"]),
        ({"sandbox_mode": "strict"}, ["sandbox_mode", "'required'"]),
    ],
)
def test_bad_policy_values_name_the_field_and_the_fix(tmp_path: Path, kw: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _ext(tmp_path, **kw)
    assert "extension 'ext'" in str(info.value) or "sandbox_mode" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_the_manager_policy_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ExtensionManagerConfig.sandbox_mode"):
        _host(tmp_path, sandbox_mode="off")
    with pytest.raises(ConfigError, match="sandbox_mode='disabled'"):
        _host(tmp_path, sandbox=None)
    with pytest.raises(ConfigError, match="ExtensionManagerConfig.limits"):
        _host(tmp_path, limits={"cpu": -1})


def test_the_backends_are_landlock_by_default_and_reach_the_resolved_policy(tmp_path: Path) -> None:
    assert _host(tmp_path).sandbox_backends == ("landlock",)
    assert resolve(_ext(tmp_path), _host(tmp_path)).backends == ("landlock",)
    layered = _host(tmp_path, sandbox_backends=["landlock", "bwrap"])
    assert layered.sandbox_backends == ("landlock", "bwrap")  # a list is taken, kept as a tuple
    assert resolve(_ext(tmp_path), layered).backends == ("landlock", "bwrap")


@pytest.mark.parametrize(
    ("backends", "words"),
    [
        ("bwrap", ["sandbox_backends must be a tuple", "('bwrap',)"]),
        (("landlock", "firejail"), ["unknown backend 'firejail'", "'landlock', 'bwrap'"]),
        ((), ["is empty", "sandbox_mode='disabled'"]),
        (("bwrap", "bwrap"), ["names a backend twice", "list each once"]),
        (None, ["must be a tuple"]),
    ],
)
def test_bad_backends_name_the_field_and_the_fix(tmp_path: Path, backends: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _host(tmp_path, sandbox_backends=backends)
    assert "ExtensionManagerConfig.sandbox_backends" in str(info.value)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("host", "ext", "words"),
    [
        ({}, {"sandbox": {"network": True}}, ["network access", "host's policy denies"]),
        ({"sandbox": {"writable_paths": ["/data/out"]}}, {"sandbox": {"writable_paths": ["/data"]}},
         ["write '/data'"]),
        ({"sandbox": {"readonly_paths": ["/models"]}}, {"sandbox": {"writable_paths": ["/models"]}},
         ["write '/models'"]),
        ({}, {"sandbox": {"readonly_paths": ["/home"]}}, ["read '/home'"]),
        ({"sandbox_mode": "required"}, {"sandbox_mode": "preferred"}, ["looser"]),
        ({"sandbox_mode": "preferred"}, {"sandbox_mode": "disabled"}, ["looser"]),
        ({"limits": {"memory": "1GiB"}}, {"limits": {"memory": "2GiB"}},
         [").memory", "more than the manager's ceiling"]),
        ({"limits": {"cpu": 1}}, {"limits": {"cpu": 2}}, [").cpu", "ceiling of 1"]),
    ],
)  # fmt: skip
def test_an_extension_can_never_widen_the_host_policy(
    tmp_path: Path, host: dict[str, object], ext: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(_ext(tmp_path, **ext), _host(tmp_path, **host))
    for word in words:
        assert word in str(info.value)
    assert "extension 'ext'" in str(info.value)


def test_an_extension_may_narrow_and_inherits_the_rest(tmp_path: Path) -> None:
    host = _host(tmp_path, sandbox_mode="preferred", sandbox={"network": True, "writable_paths": ["/data"]},
                 limits={"memory": "2GiB", "processes": 100})  # fmt: skip
    resolved = resolve(_ext(tmp_path, sandbox_mode="required", sandbox={"writable_paths": ["/data/out"]},
                            limits={"memory": "1GiB"}), host)  # fmt: skip
    assert resolved.mode == "required"
    assert resolved.policy == SandboxPolicy(network=False, writable_paths=(Path("/data/out"),))
    assert resolved.limits == Limits(memory=1 << 30, processes=100)
    assert resolve(_ext(tmp_path), host).policy == host.sandbox  # nothing of its own: the host's


def test_manifest_keys_set_the_policy_and_relative_paths_are_the_extensions(tmp_path: Path) -> None:
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "__init__.py").write_text("")
    (tmp_path / "pack" / "pyproject.toml").write_text(
        '[tool.pyisolate]\nsandbox_mode = "required"\n'
        'sandbox = { network = false, writable_paths = ["outputs"], readonly_paths = ["/data/models"] }\n'
        'limits = { memory = "1GiB", cpu = 0.5 }\n'
    )
    config = ExtensionConfig.from_path(tmp_path / "pack")
    assert config.sandbox_mode == "required"
    assert config.sandbox == SandboxPolicy(writable_paths=(tmp_path / "pack" / "outputs",),
                                           readonly_paths=(Path("/data/models"),))  # fmt: skip
    assert config.limits == Limits(memory=1 << 30, cpu=0.5)
    # ... and it is the host's policy that decides whether the pack gets them.
    with pytest.raises(ConfigError, match="write"):
        resolve(config, _host(tmp_path))


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('sandbox = { network = "off" }', ["[tool.pyisolate.sandbox]", "network must be True or False"]),
        ('sandbox = "none"', ["[tool.pyisolate].sandbox", "must be a table"]),
        ('limits = { memory = "lots" }', ["[tool.pyisolate.limits].memory", "not a size"]),
        ('sandbox_mode = "strict"', ["[tool.pyisolate].sandbox_mode"]),
    ],
)
def test_manifest_policy_errors_name_the_file(tmp_path: Path, table: str, words: list[str]) -> None:
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "__init__.py").write_text("")
    (tmp_path / "pack" / "pyproject.toml").write_text(f"[tool.pyisolate]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        ExtensionConfig.from_path(tmp_path / "pack")
    assert str(tmp_path / "pack" / "pyproject.toml") in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_other_platforms_refuse_required_and_run_preferred_unconfined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyisolate import ExtensionLoadError
    from pyisolate._host.sandbox import plan, prepare

    monkeypatch.setattr(plan.sys, "platform", "darwin")  # what a Mac reports; nothing else is faked
    where = {"venv": tmp_path, "runtime": tmp_path, "module_path": tmp_path, "class_files": [],
             "broker_endpoint": "ipc:///x", "share_torch": False}  # fmt: skip
    required = resolve(_ext(tmp_path, sandbox_mode="required"), _host(tmp_path))
    with pytest.raises(ExtensionLoadError, match="not supported on darwin yet"):
        prepare("ext", required, **where)  # type: ignore[arg-type]
    confinement = prepare("ext", resolve(_ext(tmp_path), _host(tmp_path)), **where)  # type: ignore[arg-type]
    assert confinement.boot() == {} and confinement.missing == ["sandbox: not supported on darwin"]
