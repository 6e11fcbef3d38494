"""Config validation: bad input is refused at construction, naming the field and the value."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyisolate import ConfigError, ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig
from tests.support import ext


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("dependencies", ["--index-url=http://example.invalid"], "--index-url"),
        ("dependencies", ["numpy", "six;;"], "ExtensionConfig.dependencies[1] (extension 'good')"),
        ("dependencies", ["numpy; rm -rf /"], "numpy; rm -rf /"),
        ("dependencies", ["pkg @ https://example.invalid/pkg.whl"], "https://example.invalid"),
        ("dependencies", "numpy", "numpy"),
        ("name", "../escape", "../escape"),
        ("name", "host", "host"),
        ("module_path", "/no/such/extension", "/no/such/extension"),
    ],
)
def test_bad_extension_config_is_refused_before_anything_runs(field, value, needle):
    kwargs = {"name": "good", "module_path": ext("ok"), field: value}
    with pytest.raises(ConfigError) as info:
        ExtensionConfig(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"venv_root_path": ""}, "venv_root_path"),
        ({"venv_root_path": "/tmp", "start_timeout": 0}, "start_timeout"),
        ({"venv_root_path": "/tmp", "stop_timeout": -1}, "stop_timeout"),
        ({"venv_root_path": "/tmp", "on_progress": 3}, "on_progress"),
    ],
)
def test_bad_manager_config_is_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ExtensionManagerConfig(**kwargs)


def test_config_normalises_lists_and_paths(tmp_path):
    config = ExtensionConfig(name="good", module_path=ext("ok"), dependencies=["numpy>=2"])
    assert config.dependencies == ("numpy>=2",)
    assert config.module_path.is_absolute()
    assert ExtensionManagerConfig(venv_root_path=str(tmp_path)).venv_root == tmp_path


def test_share_torch_checks_the_hosts_torch_against_the_requirements():
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="does not admit the host's torch"):
        ExtensionConfig(name="t", module_path=ext("ok"), share_torch=True, dependencies=["torch<2"])
    config = ExtensionConfig(name="t", module_path=ext("ok"), share_torch=True, dependencies=["torch>=2"])
    assert config.share_torch

def test_apis_must_be_proxied_singleton_classes():
    with pytest.raises(ConfigError, match="not a ProxiedSingleton"):
        ExtensionConfig(name="t", module_path=ext("ok"), apis=[object])
    with pytest.raises(ConfigError, match="list of ProxiedSingleton"):
        ExtensionConfig(name="t", module_path=ext("ok"), apis=dict)


def test_manager_needs_an_extension_base_subclass(tmp_path):
    config = ExtensionManagerConfig(venv_root_path=tmp_path)
    with pytest.raises(ConfigError, match="ExtensionBase"):
        ExtensionManager(object, config)
    ExtensionManager(ExtensionBase, config)  # nothing started: no loop, no broker yet


def test_importing_pyisolate_and_the_worker_side_is_light():
    import subprocess
    import sys

    code = (
        "import sys, threading, pyisolate, pyisolate.workers.loader, pyisolate.workers.connection;"
        "import pyisolate._rpc, pyisolate._rpc.blocking, pyisolate._actors, pyisolate._singleton;"
        "pyisolate.sync, pyisolate.get_actor, pyisolate.emit, pyisolate.ProxiedSingleton;"
        "assert 'pyisolate._host.manager' not in sys.modules, 'manager imported';"
        "assert 'pyisolate._envs.venv' not in sys.modules, 'venv builder imported';"
        "assert 'packaging' not in sys.modules, 'host-only dependency imported';"
        "assert threading.active_count() == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_manager_shows_users_only_what_they_call():
    """Internal methods of ExtensionManager carry a leading underscore, so the API page lists
    only the calls an application makes."""
    public = {n for n in dir(ExtensionManager) if not n.startswith("_") and callable(getattr(ExtensionManager, n))}
    assert public == {"aclose", "get_actor", "load_extension", "load_extensions", "on_event", "prestart", "stats",
                      "stop_all", "stop_all_extensions"}


def test_host_paths_are_existing_folders_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path)
    config = ExtensionConfig(name="good", module_path=ext("ok"), host_paths=["app", tmp_path / "app"])
    assert config.host_paths == (tmp_path / "app",)  # absolute, once
    assert ExtensionManagerConfig(venv_root_path=tmp_path, host_paths=["app"]).host_paths == (tmp_path / "app",)
    assert ExtensionConfig(name="good", module_path=ext("ok")).host_paths == ()  # sealed by default


def _site_dirs():
    import site
    import sysconfig

    return sorted({p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()})


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        (["/no/such/app"], ["host_paths[0]", "'/no/such/app' does not exist", "the folder the host itself has"]),
        ([__file__], ["is not a directory"]),
        ("/app", ["must be a list of directories", "['/app']"]),
        ([3], ["host_paths[0]", "must be a directory path"]),
        *[([site], ["is a package directory (site-packages)", "every package installed there",
                    "share_torch or dependencies", "application's own source root"]) for site in _site_dirs()],
    ],
)
def test_bad_host_paths_are_refused_with_the_fix(value, needles):
    for build in (lambda: ExtensionConfig(name="good", module_path=ext("ok"), host_paths=value),
                  lambda: ExtensionManagerConfig(venv_root_path="/tmp", host_paths=value)):
        with pytest.raises(ConfigError) as info:
            build()
        for needle in needles:
            assert needle in str(info.value)


def test_a_site_packages_folder_is_refused_under_any_name(tmp_path):
    import site

    alias = tmp_path / "lib"
    alias.symlink_to(site.getsitepackages()[0])
    with pytest.raises(ConfigError, match="is a package directory"):
        ExtensionConfig(name="good", module_path=ext("ok"), host_paths=[alias])


def test_sandbox_mode_takes_the_enum_and_stores_the_string(tmp_path):
    from pyisolate import SandboxMode

    assert [m.value for m in SandboxMode] == ["preferred", "required", "disabled"]
    manager = ExtensionManagerConfig(venv_root_path=tmp_path, sandbox_mode=SandboxMode.DISABLED)
    extension = ExtensionConfig(name="good", module_path=ext("ok"), sandbox_mode=SandboxMode.REQUIRED)
    assert type(manager.sandbox_mode) is str and manager.sandbox_mode == "disabled"
    assert type(extension.sandbox_mode) is str and extension.sandbox_mode == "required"
    with pytest.raises(ConfigError, match="pyisolate.SandboxMode"):
        ExtensionConfig(name="good", module_path=ext("ok"), sandbox_mode="strict")


def test_a_mapping_is_a_config_validated_exactly_like_keyword_arguments(tmp_path):
    manager = ExtensionManager(ExtensionBase, {"venv_root_path": tmp_path, "sandbox_mode": "required"})
    assert manager.config == ExtensionManagerConfig(venv_root_path=tmp_path, sandbox_mode="required")
    bad = {"name": "good", "module_path": ext("ok"), "dependencies": "numpy"}
    with pytest.raises(ConfigError) as as_keywords:
        ExtensionConfig(**bad)
    with pytest.raises(ConfigError) as as_mapping:
        manager.load_extension(bad)  # refused before anything starts: no event loop needed
    assert str(as_mapping.value) == str(as_keywords.value)
    with pytest.raises(ConfigError, match="load_extensions"):
        asyncio.run(manager.load_extensions([{"name": "good", "module_path": ext("ok"), "isolate": True}]))


@pytest.mark.parametrize(
    ("mapping", "needles"),
    [
        ({"dependancies": []}, ["unknown ExtensionConfig key 'dependancies'", "did you mean 'dependencies'?",
                                "known keys: name, module_path, isolated"]),
        ({"module": "my_pack"}, ["'module' is not used: module_path names the extension's code; remove it"]),
        ({"package_manager": "conda"}, ["package_manager='conda'", "conda/pixi environments are not supported",
                                        "built with uv", "dependencies", "find_links", "extra_index_urls"]),
        ({"package_manager": "pip"}, ["must be 'uv'", "'pip'"]),
        *[({key: []}, [f"key {key!r} is refused", "conda/pixi environments are not supported"])
          for key in ("conda_channels", "conda_dependencies", "conda_platforms", "conda_python")],
    ],
)
def test_a_mapping_key_pyisolate_does_not_take_is_refused_with_the_fix(tmp_path, mapping, needles):
    manager = ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=tmp_path))
    with pytest.raises(ConfigError) as info:
        manager.load_extension({"name": "good", "module_path": ext("ok"), **mapping})
    for needle in needles:
        assert needle in str(info.value)


def test_the_manager_config_as_a_mapping_names_an_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown ExtensionManagerConfig key 'venv_root'; did you mean "
                                          r"'venv_root_path'\? known keys: venv_root_path, on_progress"):
        ExtensionManager(ExtensionBase, {"venv_root": tmp_path})
    with pytest.raises(ConfigError, match="needs an ExtensionManagerConfig or a mapping of its fields"):
        ExtensionManager(ExtensionBase, str(tmp_path))
    with pytest.raises(ConfigError, match="needs an ExtensionConfig or a mapping of its fields"):
        ExtensionManager(ExtensionBase, {"venv_root_path": tmp_path}).load_extension(ext("ok"))


def test_upstream_keys_are_checked_against_each_other(tmp_path):
    def config(**kw):
        return ExtensionConfig(name="good", module_path=ext("ok"), **kw)

    assert config().share_cuda_ipc is None and config().execution_model is None and config().package_manager == "uv"
    with pytest.raises(ConfigError, match=r"share_cuda_ipc=True \(extension 'good'\) needs share_torch=True"):
        config(share_cuda_ipc=True)
    with pytest.raises(ConfigError, match="share_cuda_ipc .* must be True, False or None"):
        config(share_cuda_ipc="yes")
    with pytest.raises(ConfigError, match=r"must be None or one of 'host-coupled', 'sealed_worker', got 'sealed'"):
        config(execution_model="sealed")
    assert config(execution_model="host-coupled").execution_model == "host-coupled"
    with pytest.raises(ConfigError, match="only valid with execution_model='sealed_worker'; set that, or list the "
                                          "folders in host_paths"):
        config(sealed_host_ro_paths=[tmp_path])
    sealed = config(execution_model="sealed_worker", sealed_host_ro_paths=[tmp_path], host_paths=[tmp_path / ".."])
    assert sealed.host_paths == (tmp_path.parent, tmp_path)  # its host_paths, then the sealed ones
    with pytest.raises(ConfigError, match="sealed_host_ro_paths.* does not exist"):
        config(execution_model="sealed_worker", sealed_host_ro_paths=[tmp_path / "missing"])


def test_a_sealed_worker_shares_nothing_of_the_hosts_torch():
    pytest.importorskip("torch")
    for flags, named in (({"share_torch": True}, "share_torch"), ({"share_cuda_ipc": True}, "share_cuda_ipc")):
        with pytest.raises(ConfigError) as info:
            ExtensionConfig(name="good", module_path=ext("ok"), execution_model="sealed_worker", **flags)
        assert "shares nothing from the host but the folders in host_paths" in str(info.value)
        assert f"{named}=True; set {named}=False, or execution_model='host-coupled'" in str(info.value)
    assert ExtensionConfig(name="good", module_path=ext("ok"), share_torch=True, share_cuda_ipc=True,
                           execution_model="host-coupled").share_cuda_ipc
