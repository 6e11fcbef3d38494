"""Extension manifests: pyproject.toml -> ExtensionConfig, precedence, and errors that say where and how."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyisolate import ConfigError, ExtensionConfig, RestartPolicy


def _extension(root: Path, manifest: str | None = None, *, name: str = "ext", init: bool = True) -> Path:
    directory = root / name
    directory.mkdir()
    if init:
        (directory / "__init__.py").write_text("")
    if manifest is not None:
        (directory / "pyproject.toml").write_text(manifest)
    return directory


FULL = """\
[project]
name = "full-ext"
requires-python = ">=3.11"
dependencies = ["six==1.16.0", "attrs>=23; python_version >= '3.11'"]

[tool.pyisolate]
pass_env = ["HF_HOME"]
env = { HF_HUB_OFFLINE = "1" }
isolated = true
restart = { max_restarts = 5, within = 30, calls_during_restart = "fail" }
"""


def test_manifest_feeds_every_setting(tmp_path: Path) -> None:
    config = ExtensionConfig.from_path(_extension(tmp_path, FULL))
    assert config.name == "full-ext"
    assert config.module_path == tmp_path / "ext"
    assert config.dependencies == ("six==1.16.0", "attrs>=23; python_version >= '3.11'")
    assert config.pass_env == ("HF_HOME",)
    assert config.env == {"HF_HUB_OFFLINE": "1"}
    assert config.restart == RestartPolicy(max_restarts=5, within=30, calls_during_restart="fail")


def test_keyword_arguments_override_the_manifest(tmp_path: Path) -> None:
    directory = _extension(tmp_path, FULL)
    config = ExtensionConfig.from_path(directory, name="mine", dependencies=[], restart=None, isolated=False)
    assert (config.name, config.dependencies, config.restart, config.isolated) == ("mine", (), None, False)
    assert config.env == {"HF_HUB_OFFLINE": "1"}  # what is not overridden still comes from the manifest


def test_without_a_manifest_the_directory_is_enough(tmp_path: Path) -> None:
    config = ExtensionConfig.from_path(_extension(tmp_path, name="bare_ext"))
    assert (config.name, config.dependencies, config.restart) == ("bare_ext", (), None)


def test_a_single_py_file_is_an_extension_too(tmp_path: Path) -> None:
    (tmp_path / "single.py").write_text("")
    assert ExtensionConfig.from_path(tmp_path / "single.py").name == "single"


@pytest.mark.parametrize(
    ("manifest", "directory", "expected"),
    [
        ('[project]\nname = "proj"\n[tool.pyisolate]\nname = "tool-name"\n', "dir", "tool-name"),
        ('[project]\nname = "proj.name"\n', "dir", "proj.name"),
        (None, "My Node Pack (v2)", "My-Node-Pack-v2"),
        (None, "..dots...here", "dots.here"),
    ],
)
def test_name_precedence_and_normalisation(tmp_path: Path, manifest: str | None, directory: str, expected: str) -> None:
    assert ExtensionConfig.from_path(_extension(tmp_path, manifest, name=directory)).name == expected


def test_restart_true_means_the_default_policy(tmp_path: Path) -> None:
    directory = _extension(tmp_path, "[tool.pyisolate]\nrestart = true\n")
    assert ExtensionConfig.from_path(directory).restart == RestartPolicy()


def test_a_name_that_cannot_be_made_valid_asks_for_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[tool.pyisolate\] table .* or pass name="):
        ExtensionConfig.from_path(_extension(tmp_path, name="host"))


def test_local_path_dependencies_are_relative_to_the_extension(tmp_path: Path) -> None:
    manifest = '[project]\ndependencies = ["./vendor/pkg"]\n[tool.pyisolate]\nallow_direct_references = true\n'
    directory = _extension(tmp_path, manifest)
    (directory / "vendor" / "pkg").mkdir(parents=True)
    assert ExtensionConfig.from_path(directory).dependencies == (str(directory / "vendor" / "pkg"),)


def test_an_unknown_override_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="dependancies"):
        ExtensionConfig.from_path(_extension(tmp_path), dependancies=["six"])


@pytest.mark.parametrize(
    ("manifest", "field", "fix"),
    [
        ("[tool.pyisolate\nshare_torch = true\n", "not valid TOML", "fix the syntax"),
        ('[tool.pyisolate]\nshare_torch = "yes"\n', "[tool.pyisolate].share_torch", "share_torch = true"),
        ("[tool.pyisolate]\nsharetorch = true\n", "[tool.pyisolate].sharetorch", "did you mean 'share_torch'"),
        ('[tool.pyisolate]\napis = ["shared:DB"]\n', "[tool.pyisolate].apis", "the host passes apis=[...]"),
        ('[tool.pyisolate]\nhost_paths = ["/app"]\n', "[tool.pyisolate].host_paths",
         "the host passes host_paths=[...]"),
        ('[tool.pyisolate]\nsealed_host_ro_paths = ["/app"]\n', "[tool.pyisolate].sealed_host_ro_paths",
         "host's decision"),
        ('[tool.pyisolate]\npass_env = "HOME"\n', "[tool.pyisolate].pass_env", 'pass_env = ["HF_HOME"]'),
        ("[tool.pyisolate]\nenv = { A = 1 }\n", "[tool.pyisolate].env", 'env = { HF_HUB_OFFLINE = "1" }'),
        ("[tool.pyisolate]\nrestart = { within = -1 }\n", "[tool.pyisolate.restart]", "RestartPolicy.within"),
        ("[tool.pyisolate]\nrestart = { retries = 3 }\n", "[tool.pyisolate.restart].retries", "max_restarts"),
        ('[tool.pyisolate]\nname = "../up"\n', "'../up'", "A-Z a-z 0-9"),
        ('[project]\ndependencies = ["numpy<2", "-e ."]\n', "[project].dependencies[1]", "requirement like"),
        ('[project]\ndependencies = ["x @ https://e.invalid/x.whl"]\n', "[project].dependencies[0]",
         "allow_direct_references"),
        ('[project]\ndependencies = "numpy"\n', "[project].dependencies", '["numpy<2"]'),
        ('[project]\ndynamic = ["dependencies"]\n', "[project].dynamic", "list them in [project].dependencies"),
        ('[project]\nrequires-python = ">=4"\n', "[project].requires-python", "relax requires-python"),
        ("project = 3\n", "[project]", "[project] section"),
        ('[project]\ndependancies = ["six"]\n', "[project].dependancies", "did you mean 'dependencies'"),
        ('[project]\nrequires = ["six"]\n', "[project].requires", "dependencies = ['six']"),
    ],
)
def test_a_malformed_manifest_names_the_file_the_field_and_the_fix(
    tmp_path: Path, manifest: str, field: str, fix: str
) -> None:
    directory = _extension(tmp_path, manifest)
    with pytest.raises(ConfigError) as info:
        ExtensionConfig.from_path(directory)
    message = str(info.value)
    assert str(directory / "pyproject.toml") in message
    assert field in message
    assert fix in message


def test_a_manifest_without_code_says_what_is_missing(tmp_path: Path) -> None:
    directory = _extension(tmp_path, '[project]\nname = "no-code"\n', init=False)
    with pytest.raises(ConfigError) as info:
        ExtensionConfig.from_path(directory)
    assert "__init__.py" in str(info.value) and str(directory / "pyproject.toml") in str(info.value)


def test_not_an_extension_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an extension directory"):
        ExtensionConfig.from_path(tmp_path / "missing")


def test_requires_python_that_admits_the_host_passes(tmp_path: Path) -> None:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    directory = _extension(tmp_path, f'[project]\nrequires-python = "=={running}.*"\n')
    assert ExtensionConfig.from_path(directory).name == "ext"


def test_other_unknown_project_keys_pass_and_dependencies_wins(tmp_path: Path) -> None:
    """Only a near miss of a missing `dependencies` is refused; with `dependencies` present, or
    a key nothing like it, the manifest reads as before."""
    ok = _extension(tmp_path, '[project]\ndependencies = ["six"]\nrequires = ["x"]\n', name="a")
    assert ExtensionConfig.from_path(ok).dependencies == ("six",)
    other = _extension(tmp_path, '[project]\nhomepage = "https://example.invalid"\n', name="b")
    assert ExtensionConfig.from_path(other).dependencies == ()
