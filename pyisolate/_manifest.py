"""Read an extension's ``pyproject.toml``: ``[project]`` and ``[tool.pyisolate]`` -> config values.

The manifest is optional. What it may hold::

    [project]
    name = "my-extension"              # the extension's name unless [tool.pyisolate].name says
    dependencies = ["numpy<2"]         # installed into the extension's venv
    requires-python = ">=3.11"         # checked against the host's interpreter (venvs use it)

    [tool.pyisolate]
    name = "my_ext"                    # overrides [project].name
    share_torch = true
    isolated = true
    allow_direct_references = false
    pass_env = ["HF_HOME"]
    env = { HF_HUB_OFFLINE = "1" }
    restart = { max_restarts = 3, within = 60 }   # or true (defaults) / false (never)
    index_url = "https://download.pytorch.org/whl/cu128"   # package sources: see
    extra_index_urls = ["https://mirror.example/simple"]    # docs/guides/package-sources.md
    find_links = ["wheels"]                                  # relative to the extension's directory
    share_torch_no_deps = ["some-torch-addon"]
    cuda_wheels = { index_url = "https://example.org/cuda-wheels/", packages = ["flash-attn"] }

``apis`` and ``host_paths`` are deliberately not read: which host services an extension may
call, and which of the host's code it sees, are the host's decisions; and resolving
``"module:Class"`` strings would import code in the host on the manifest's say-so. This
module only reads files; it builds no config and imports nothing.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from ._limits import Limits
from ._policy import SandboxPolicy, check_mode
from ._sources import CudaWheels, Where, check_find_links, check_names, check_url
from ._validate import validate_dependencies
from .errors import ConfigError

__all__ = ["MANIFEST", "Manifest", "default_name", "read_manifest"]

MANIFEST = "pyproject.toml"
_ARCHIVES = (".whl", ".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")
_RESTART_KEYS = ("max_restarts", "within", "backoff", "max_backoff", "calls_during_restart")
_APIS_REFUSED = (
    "apis cannot be set in a manifest: which host services an extension may call is the host's "
    "decision; the host passes apis=[...] to ExtensionConfig.from_path() or pyisolate.discover()"
)
_HOST_PATHS_REFUSED = (
    "cannot be set in a manifest: which of the host's own code an extension sees is the host's decision; "
    "the host passes host_paths=[...] to ExtensionConfig.from_path() or pyisolate.discover(), or sets "
    "ExtensionManagerConfig(host_paths=[...])"
)
#: Keys a manifest may not set, because the host decides them, and why.
_HOST_DECIDES = {"apis": _APIS_REFUSED, "host_paths": f"host_paths {_HOST_PATHS_REFUSED}",
                 "sealed_host_ro_paths": f"sealed_host_ro_paths {_HOST_PATHS_REFUSED}"}


@dataclass(frozen=True)
class Manifest:
    """What a directory's ``pyproject.toml`` says, as ``ExtensionConfig`` keyword values.

    Attributes:
        path: The manifest file, or None when the directory has none.
        values: ``ExtensionConfig`` fields the manifest sets (never ``module_path``); ``restart``
            as written (a bool, or a table whose keys are checked), for ``ExtensionConfig.from_path``
            to make the policy.
        project_name: ``[project].name`` as written, or None.
    """

    path: Path | None
    values: dict[str, Any] = field(default_factory=dict)
    project_name: str | None = None


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v and "=" not in v for v in value)


def _is_env(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in value.items()
    )


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_restart(value: Any) -> bool:
    return isinstance(value, (bool, dict))


# key -> (type check, what to write instead)
_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_name, 'a string, e.g. name = "my-extension"'),
    "isolated": (_is_bool, "true or false, e.g. isolated = true"),
    "share_torch": (_is_bool, "true or false, e.g. share_torch = true"),
    "allow_direct_references": (_is_bool, "true or false, e.g. allow_direct_references = true"),
    "pass_env": (_is_names, 'a list of variable names, e.g. pass_env = ["HF_HOME"]'),
    "env": (_is_env, 'a table of strings, e.g. env = { HF_HUB_OFFLINE = "1" }'),
    "restart": (_is_restart, "true, false or a table, e.g. restart = { max_restarts = 3, within = 60 }"),
    "sandbox_mode": (_is_name, 'a string, e.g. sandbox_mode = "required"'),
    "sandbox": (_is_table, 'a table, e.g. sandbox = { network = false, writable_paths = ["outputs"] }'),
    "limits": (_is_table, 'a table, e.g. limits = { memory = "4GiB", cpu = 1.5 }'),
    "index_url": (_is_name, 'a URL string, e.g. index_url = "https://download.pytorch.org/whl/cu128"'),
    "extra_index_urls": (_is_strings, 'a list of URLs, e.g. extra_index_urls = ["https://mirror.example/simple"]'),
    "find_links": (_is_strings, 'a list of folders or URLs, e.g. find_links = ["wheels"]'),
    "cuda_wheels": (_is_table, 'a table, e.g. cuda_wheels = { index_url = "https://...", packages = ["flash-attn"] }'),
    "share_torch_no_deps": (_is_strings, 'a list of package names, e.g. share_torch_no_deps = ["some-addon"]'),
}


def _fail(path: Path, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {where} {problem}")


def read_manifest(directory: Path) -> Manifest:
    """Read ``directory/pyproject.toml`` into ``ExtensionConfig`` keyword values.

    Args:
        directory: The extension's directory.

    Returns:
        The manifest's values; an empty Manifest when there is no ``pyproject.toml``.

    Raises:
        ConfigError: the file is not valid TOML, a field has the wrong type or value, a
            ``[tool.pyisolate]`` key is unknown, or a dependency is not a PEP 508 requirement.
            The message names the file, the field and the fix.
    """
    path = directory / MANIFEST
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return Manifest(None)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax (see https://toml.io)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None

    project = data.get("project", {})
    if not isinstance(project, dict):
        raise _fail(path, "[project]", "must be a table; write it as a [project] section")
    tool = data.get("tool", {})
    settings = tool.get("pyisolate", {}) if isinstance(tool, dict) else {}
    if not isinstance(settings, dict):
        raise _fail(path, "[tool.pyisolate]", "must be a table; write it as a [tool.pyisolate] section")

    values: dict[str, Any] = {}
    for key, value in settings.items():
        if key in _HOST_DECIDES:
            raise _fail(path, f"[tool.pyisolate].{key}:", _HOST_DECIDES[key])
        if key not in _SCHEMA:
            close = difflib.get_close_matches(key, _SCHEMA, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _fail(path, f"[tool.pyisolate].{key}", f"is not a pyisolate setting; {hint}known settings: "
                        f"{', '.join(sorted(_SCHEMA))}")
        check, fix = _SCHEMA[key]
        if not check(value):
            raise _fail(path, f"[tool.pyisolate].{key}", f"must be {fix}; got {value!r}")
        values[key] = value

    if isinstance(values.get("restart"), dict):
        table = values["restart"]
        for key in table:
            if key not in _RESTART_KEYS:
                raise _fail(path, f"[tool.pyisolate.restart].{key}", f"is not a restart setting; known: "
                            f"{', '.join(_RESTART_KEYS)}")

    _read_policy(path, directory, values)
    _read_sources(path, directory, values)

    project_name = project.get("name")
    if project_name is not None and not isinstance(project_name, str):
        raise _fail(path, "[project].name", f'must be a string, e.g. name = "my-extension"; got {project_name!r}')
    _check_requires_python(path, project.get("requires-python"))

    if "dependencies" not in project:
        _check_dependencies_spelling(path, project)
    if "dependencies" in project.get("dynamic", ()):
        raise _fail(path, "[project].dynamic", "lists 'dependencies', which pyisolate cannot compute; "
                    "list them in [project].dependencies instead")
    if "dependencies" in project:
        deps = project["dependencies"]
        if not isinstance(deps, list):
            raise _fail(path, "[project].dependencies", f'must be a list of strings, e.g. ["numpy<2"]; got {deps!r}')
        allow = values.get("allow_direct_references", False)
        deps = [_localize(dep, directory) if allow else dep for dep in deps]
        for index, dep in enumerate(deps):
            try:
                validate_dependencies([dep], allow_direct_references=allow)
            except ConfigError as exc:
                raise _fail(path, f"[project].dependencies[{index}]:", str(exc)) from None
        values["dependencies"] = deps
    return Manifest(path, values, project_name)


def _read_policy(path: Path, directory: Path, values: dict[str, Any]) -> None:
    """Check the sandbox settings and make them policy objects; relative paths are the extension's."""
    if "sandbox_mode" in values:
        try:
            check_mode(values["sandbox_mode"], "[tool.pyisolate].sandbox_mode")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if "sandbox" in values:
        table = dict(values["sandbox"])
        for key in ("writable_paths", "readonly_paths"):
            if isinstance(table.get(key), list):
                table[key] = [str(directory / item) if isinstance(item, str) else item for item in table[key]]
        try:
            values["sandbox"] = SandboxPolicy.parse(table, "[tool.pyisolate.sandbox]")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if "limits" in values:
        try:
            values["limits"] = Limits.parse(values["limits"], where="[tool.pyisolate.limits]")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _read_sources(path: Path, directory: Path, values: dict[str, Any]) -> None:
    """Check the package sources; relative find_links folders are the extension directory's."""
    try:
        if "index_url" in values:
            check_url(values["index_url"], "[tool.pyisolate].index_url")
        for index, url in enumerate(values.get("extra_index_urls", ())):
            check_url(url, Where("[tool.pyisolate].extra_index_urls")[index])
        if "find_links" in values:
            values["find_links"] = list(check_find_links(values["find_links"], "[tool.pyisolate].find_links",
                                                         base=directory))
        if "cuda_wheels" in values:
            values["cuda_wheels"] = CudaWheels.parse(values["cuda_wheels"], "[tool.pyisolate.cuda_wheels]").as_dict()
        if "share_torch_no_deps" in values:
            check_names(values["share_torch_no_deps"], "[tool.pyisolate].share_torch_no_deps")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


#: The keys PEP 621 allows in [project]; a key outside them that looks like "dependencies" is a
#: typo that would otherwise build an empty venv and fail later, far from its cause.
_PROJECT_KEYS = frozenset({
    "name", "version", "description", "readme", "requires-python", "license", "license-files",
    "authors", "maintainers", "keywords", "classifiers", "urls", "scripts", "gui-scripts",
    "entry-points", "dependencies", "optional-dependencies", "dynamic", "import-names",
    "import-namespaces",
})  # fmt: skip
_DEPENDENCY_MISSPELLINGS = frozenset({"requires", "requirements", "depends", "deps", "install_requires",
                                      "install-requires", "dependency", "require"})


def _check_dependencies_spelling(path: Path, project: dict[str, Any]) -> None:
    """No [project].dependencies: refuse a key that was surely meant to be it."""
    unknown = [key for key in project if key not in _PROJECT_KEYS]
    for key in unknown:
        if key.lower() in _DEPENDENCY_MISSPELLINGS or difflib.get_close_matches(key.lower(), ["dependencies"],
                                                                                 n=1, cutoff=0.75):
            raise _fail(path, f"[project].{key}", "is not a [project] key, and [project] has no dependencies; did "
                        f"you mean 'dependencies'? Rename it: dependencies = {project[key]!r}")


def _check_requires_python(path: Path, spec: Any) -> None:
    if spec is None:
        return
    where = "[project].requires-python"
    if not isinstance(spec, str):
        raise _fail(path, where, f'must be a string, e.g. requires-python = ">=3.11"; got {spec!r}')
    try:
        specifier = SpecifierSet(spec)
    except InvalidSpecifier:
        raise _fail(path, where, f'{spec!r} is not a version specifier; write e.g. ">=3.11"') from None
    running = ".".join(map(str, sys.version_info[:3]))
    if not specifier.contains(running, prereleases=True):
        raise _fail(path, where, f"is {spec!r}, but extension venvs use the host's Python {running}; "
                    "run the host on a Python the extension supports, or relax requires-python")


def _localize(dep: Any, directory: Path) -> Any:
    """Make a relative local path among the dependencies relative to the extension directory."""
    if not isinstance(dep, str):
        return dep
    text = dep.strip()
    try:
        Requirement(text)
        if not text.lower().endswith(_ARCHIVES):
            return dep  # a requirement (maybe name @ url): not a path
    except InvalidRequirement:
        pass
    if "://" in text or os.path.isabs(text):
        return dep
    return str(directory / text)


_INVALID = re.compile(r"[^A-Za-z0-9_.-]+")


def default_name(raw: str) -> str:
    """Turn a project or directory name into a valid extension name (best effort).

    Runs of characters an extension name cannot hold become ``-``, runs of dots one dot,
    leading punctuation is dropped and the result is cut to 64 characters. The caller
    validates the result.
    """
    name = re.sub(r"\.{2,}", ".", _INVALID.sub("-", raw)).lstrip("_.-")[:64]
    return name.rstrip(".-") or raw
