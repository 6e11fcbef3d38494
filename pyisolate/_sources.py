"""Where an extension's packages come from: package indexes, folders of wheels, CUDA wheel indexes.

What a user writes (``ExtensionConfig.index_url``, ``extra_index_urls``, ``find_links``,
``cuda_wheels`` and ``share_torch_no_deps``, or the same keys of a manifest) is checked here,
and the venv builder receives it as one ``PackageSources`` value. This module checks values and
paths only; it opens no connection.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .errors import ConfigError

__all__ = [
    "CUDA_WHEELS_KEYS", "CudaWheels", "PackageSources", "Where", "check_find_links", "check_listed", "check_names",
    "check_url",
]  # fmt: skip

_SCHEMES = ("http", "https", "file")
_EXAMPLE_URL = "https://download.pytorch.org/whl/cu128"
# PEP 508 names (the same rule as packaging's, which validates only from 24.0 on).
_NAME = re.compile(r"[A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9]", re.IGNORECASE)
#: The keys of ``cuda_wheels``, as pyisolate 0.10 hosts (ComfyUI) write them.
CUDA_WHEELS_KEYS = ("index_url", "index_urls", "packages", "package_map")


@dataclass(frozen=True)
class Where:
    """How a message names a setting: ``ExtensionConfig.find_links[1] (extension 'x')``.

    Attributes:
        field: The setting, as the user wrote it (``ExtensionConfig.find_links``,
            ``[tool.pyisolate].find_links``).
        owner: What it belongs to, said after any index (`` (extension 'x')``); may be empty.
    """

    field: str
    owner: str = ""

    def __str__(self) -> str:
        return f"{self.field}{self.owner}"

    def __getitem__(self, part: int | str) -> Where:
        """The item ``part`` of the setting (a list index, or a key)."""
        return Where(f"{self.field}[{part!r}]", self.owner)

    def key(self, name: str) -> Where:
        """The key ``name`` of a table setting."""
        return Where(f"{self.field}.{name}", self.owner)


def _where(where: Where | str) -> Where:
    return where if isinstance(where, Where) else Where(where)


def check_url(value: object, where: Where | str) -> str:
    """Return ``value`` as an index or wheel-folder URL, or raise ConfigError saying how to fix it.

    Accepted: ``http://`` and ``https://`` with a host, and ``file:///absolute/path``.
    """
    where = _where(where)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a URL string, e.g. {_EXAMPLE_URL!r}; got {value!r}")
    text = value.strip()
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ConfigError(f"{where}: {text!r} holds spaces or control characters; percent-encode them (%20)")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} is not a valid URL ({exc}); write e.g. {_EXAMPLE_URL!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{where}: {text!r} is not an http://, https:// or file:// URL; give the index's address, "
            f"e.g. {_EXAMPLE_URL!r} (a folder of wheels goes in find_links as a path)"
        )
    if scheme != "file" and not parts.hostname:
        raise ConfigError(f"{where}: {text!r} has no host; write it as {scheme}://<host>/<path>")
    if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise ConfigError(f"{where}: {text!r} is not a local file URL; write file:///absolute/path")
    return text


def check_find_links(value: object, where: Where | str, *, base: Path | None = None) -> tuple[str, ...]:
    """Return ``value`` as absolute wheel-folder paths and URLs, or raise ConfigError saying how to fix it.

    A folder must exist (``file://`` URLs too); a relative path is taken from ``base``, else from
    the current directory.
    """
    where = _where(where)
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Sequence):
        raise ConfigError(f"{where} must be a list of folders or URLs, got {value!r}; write [{value!r}]")
    found = []
    for index, item in enumerate(value):
        at = where[index]
        if isinstance(item, str) and "://" in item:
            url = check_url(item, at)
            if urlsplit(url).scheme.lower() != "file":
                found.append(url)
                continue
            _existing_folder(Path(unquote(urlsplit(url).path)), at)
            found.append(url)
        elif isinstance(item, (str, os.PathLike)) and str(item):
            path = Path(item).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            found.append(str(_existing_folder(path.absolute(), at)))
        else:
            raise ConfigError(f"{at} must be a folder of wheels or an http(s):// URL, got {item!r}")
    return tuple(found)


def _existing_folder(path: Path, where: Where) -> Path:
    if not path.exists():
        raise ConfigError(
            f"{where}: {str(path)!r} does not exist; give a folder that holds wheels (in a manifest, "
            "relative to the extension's folder) or an http(s):// URL"
        )
    if not path.is_dir():
        raise ConfigError(f"{where}: {str(path)!r} is a file, not a folder; give the folder that holds it")
    return path


def check_names(value: object, where: Where | str) -> tuple[str, ...]:
    """Return ``value`` as canonical distribution names, or raise ConfigError saying how to fix it."""
    where = _where(where)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{where} must be a list of package names, got {value!r}; write [{value!r}]")
    return tuple(dict.fromkeys(_check_name(item, where[index]) for index, item in enumerate(value)))


def _check_name(value: object, where: Where) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value.strip()):
        raise ConfigError(f"{where}: {value!r} is not a package name; give the name alone, as in dependencies "
                          "(e.g. 'flash-attn', no version)")
    return canonicalize_name(value.strip())


def _dependency_names(dependencies: Sequence[str]) -> set[str]:
    names: set[str] = set()
    for text in dependencies:
        try:
            names.add(canonicalize_name(Requirement(text).name))
        except InvalidRequirement:
            continue  # a local path: it has no name to list
    return names


def check_listed(names: Sequence[str], dependencies: Sequence[str], where: Where | str) -> None:
    """Raise ConfigError unless each of ``names`` is the name of a requirement among ``dependencies``."""
    known = _dependency_names(dependencies)
    for name in names:
        if name not in known:
            listed = ", ".join(map(repr, dependencies)) or "none"
            raise ConfigError(
                f"{where} names {name!r}, which is not among the dependencies ({listed}); add {name!r} "
                "to the dependencies, or take it off this list"
            )


@dataclass(frozen=True, kw_only=True)
class CudaWheels:
    """Packages installed from CUDA wheel indexes, each the wheel built for the host's torch.

    Attributes:
        index_urls: PEP 503 "simple" indexes to read, in order.
        packages: Canonical names of the dependencies installed from there (without their
            dependencies).
        package_map: Canonical dependency name -> the distribution's name on the indexes, where
            they differ.
    """

    index_urls: tuple[str, ...]
    packages: tuple[str, ...]
    package_map: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: object, where: Where | str) -> CudaWheels:
        """Check a ``cuda_wheels`` table (keys as in ``CUDA_WHEELS_KEYS``) and return it as CudaWheels.

        Raises:
            ConfigError: a key is unknown, missing or of the wrong type; the message says the fix.
        """
        where = _where(where)
        if isinstance(value, CudaWheels):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table (a dict) with index_url and packages, e.g. index_url = "
                              f"{_EXAMPLE_URL!r}, packages = ['flash-attn']; got {value!r}")
        unknown = sorted(str(key) for key in value if key not in CUDA_WHEELS_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(CUDA_WHEELS_KEYS)}")
        urls: list[str] = []
        if "index_url" in value:
            urls.append(check_url(value["index_url"], where.key("index_url")))
        if "index_urls" in value:
            listed = value["index_urls"]
            if isinstance(listed, str) or not isinstance(listed, Sequence) or not listed:
                raise ConfigError(f"{where.key('index_urls')} must be a non-empty list of URLs, got {listed!r}; "
                                  f"write [{listed!r}]")
            urls += [check_url(url, where.key("index_urls")[i]) for i, url in enumerate(listed)]
        if not urls:
            raise ConfigError(f"{where} needs index_url (or index_urls), the index its packages come from, "
                              f"e.g. index_url = {_EXAMPLE_URL!r}")
        packages = check_names(value.get("packages", ()), where.key("packages"))
        if not packages:
            raise ConfigError(f"{where.key('packages')} is empty; name the dependencies to install from the index, "
                              "e.g. packages = ['flash-attn'], or remove cuda_wheels")
        mapping = value.get("package_map", {})
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where.key('package_map')} must be a table of names, dependency -> name on the "
                              f"index, e.g. {{'flash-attn': 'flash-attn-cu128'}}; got {mapping!r}")
        package_map = {}
        for key, dist in mapping.items():
            at = where.key("package_map")[key]
            name = _check_name(key, at)
            if name not in packages:
                raise ConfigError(f"{at}: {key!r} is not in {where.key('packages').field}; add it there, or remove it "
                                  "from package_map")
            package_map[name] = _check_name(dist, at)
        return cls(index_urls=tuple(dict.fromkeys(urls)), packages=packages, package_map=package_map)

    def distribution(self, package: str) -> str:
        """The distribution's name on the indexes for the dependency named ``package``."""
        name = canonicalize_name(package)
        return self.package_map.get(name, name)

    def as_dict(self) -> dict[str, Any]:
        """The table, as plain JSON-able values (``index_urls`` form)."""
        return {"index_urls": list(self.index_urls), "packages": list(self.packages),
                "package_map": dict(sorted(self.package_map.items()))}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PackageSources:
    """Where the packages of one venv come from; the default is uv's own (PyPI).

    Attributes:
        index_url: Replaces the default index.
        extra_index_urls: Indexes uv reads besides (and, its ``first-index`` strategy, before) it.
        find_links: Folders of wheels (absolute paths) and URLs of wheel listings.
        cuda_wheels: Dependencies installed from CUDA wheel indexes.
        no_deps: Canonical names of dependencies installed without their own dependencies.
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    cuda_wheels: CudaWheels | None = None
    no_deps: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self != PackageSources()

    def uv_options(self) -> list[str]:
        """The options that point ``uv pip install`` at these sources."""
        options = ["--default-index", self.index_url] if self.index_url else []
        for url in self.extra_index_urls:
            options += ["--extra-index-url", url]
        for link in self.find_links:
            options += ["--find-links", link]
        return options

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set, as plain JSON-able values (a venv's fingerprint and marker)."""
        data: dict[str, Any] = {}
        if self.index_url:
            data["index_url"] = self.index_url
        if self.extra_index_urls:
            data["extra_index_urls"] = list(self.extra_index_urls)
        if self.find_links:
            data["find_links"] = list(self.find_links)
        if self.cuda_wheels is not None:
            data["cuda_wheels"] = self.cuda_wheels.as_dict()
        if self.no_deps:
            data["no_deps"] = list(self.no_deps)
        return data

    @classmethod
    def from_dict(cls, data: object) -> PackageSources:
        """The sources ``as_dict`` wrote (a venv's marker), unchecked: only for comparison and rebuild.

        Raises:
            ConfigError: ``data`` is not what ``as_dict`` writes.
        """
        if data is None:
            return cls()
        unreadable = ConfigError(f"recorded package sources {data!r} are not readable; rebuild the venv")
        if not isinstance(data, dict):
            raise unreadable
        try:
            cuda = data.get("cuda_wheels")
            return cls(
                index_url=data.get("index_url"),
                extra_index_urls=tuple(data.get("extra_index_urls", ())),
                find_links=tuple(data.get("find_links", ())),
                cuda_wheels=None if cuda is None else CudaWheels(
                    index_urls=tuple(cuda["index_urls"]), packages=tuple(cuda["packages"]),
                    package_map=dict(cuda["package_map"]),
                ),
                no_deps=tuple(data.get("no_deps", ())),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise unreadable from None
