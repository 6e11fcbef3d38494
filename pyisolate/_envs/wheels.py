"""CUDA wheels: on a PEP 503 index, find the wheel of a package built for the host's torch.

Indexes of compiled torch extensions (flash-attn, spconv, ...) hold one wheel per torch and CUDA
build, told apart by the PEP 440 local version label: ``1.2+pt213cu128``, ``1.2+cu128torch2.13``,
``1.2+torch260cpu``. A torch token (``torch2.13``, ``torch213``, ``pt213``, ``pt2130``) and a CUDA
token (``cu128``, ``cu12``, ``cpu``) that a label holds must match the host's torch; a label
without one matches any. Among the wheels that match and install on this interpreter, the
highest version wins; at equal versions, one that names its torch, then the most specific
platform tag.

``choose`` is pure (the host's torch and tags are arguments); ``read_index`` reads one index page
and blocks; ``cuda_requirements`` runs both for the venv builder, the blocking parts in threads,
each within a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from .._sources import CudaWheels
from ..errors import EnvironmentBuildError

__all__ = ["INDEX_TIMEOUT", "IndexReadError", "Link", "TorchBuild", "choose", "cuda_requirements", "read_index",
           "redact"]  # fmt: skip

#: Seconds each step of choosing CUDA wheels may take: importing torch, reading one index page.
INDEX_TIMEOUT = 60.0
_SHOWN = 40  # wheel names a no-match error lists
_MAX_PAGE_BYTES = 64 * 1024 * 1024  # PyTorch's own torch page is a few MB
_HASHES = ("sha256=", "sha384=", "sha512=")
_TORCH_TOKEN = re.compile(r"(?<![a-z])(?:torch|pt)(\d+(?:\.\d+)*)")
_CUDA_TOKEN = re.compile(r"(?<![a-z])cu(\d+)")
_CPU_TOKEN = re.compile(r"(?<![a-z])cpu")
_ROCM_TOKEN = re.compile(r"(?<![a-z])rocm\d")


class IndexReadError(OSError):
    """An index page could not be read (unreachable, refused, too large)."""


@dataclass(frozen=True)
class TorchBuild:
    """The host's torch as the labels of CUDA wheels name it.

    Attributes:
        version: The public version, e.g. ``"2.13.0"``.
        cuda: ``torch.version.cuda`` (``"12.8"``), or None for a CPU-only build.
    """

    version: str
    cuda: str | None

    @classmethod
    def of_host(cls) -> TorchBuild | None:
        """The host's torch, or None if it has none. Blocks: it may import torch."""
        try:
            full = Version(importlib.metadata.version("torch"))
        except (importlib.metadata.PackageNotFoundError, ValueError):
            return None
        try:
            import torch

            cuda = torch.version.cuda
        except Exception:  # torch is there but does not import: its label says how it was built
            match = re.fullmatch(r"cu(\d+)(\d)", full.local or "")
            cuda = f"{match[1]}.{match[2]}" if match else None
        return cls(full.public, cuda)

    def torch_tokens(self) -> frozenset[str]:
        """The version parts a torch token may carry: ``213``, ``2.13``, ``2130``, ``2.13.0``."""
        release = Version(self.version).release
        major, minor, patch = (*release, 0, 0)[:3]
        return frozenset({f"{major}{minor}", f"{major}.{minor}", f"{major}{minor}{patch}",
                          f"{major}.{minor}.{patch}"})  # fmt: skip

    def cuda_tokens(self) -> frozenset[str]:
        """The CUDA tokens that match: ``cu128`` and ``cu12`` for CUDA 12.8, ``cpu`` for none."""
        if self.cuda is None:
            return frozenset({"cpu"})
        parts = self.cuda.split(".")
        return frozenset({f"cu{''.join(parts[:2])}", f"cu{parts[0]}"})

    def describe(self) -> str:
        """The host's torch and the tokens a wheel's label may carry, in words."""
        cuda = f"CUDA {self.cuda}" if self.cuda else "CPU only"
        accepted = ", ".join(sorted(f"pt{t}" for t in self.torch_tokens() if "." not in t))
        accepted += ", " + ", ".join(sorted(f"torch{t}" for t in self.torch_tokens()))
        tokens = " or ".join(sorted(self.cuda_tokens(), key=lambda t: (-len(t), t)))
        tokens += " or none" if self.cuda is None else ""
        return f"torch {self.version} ({cuda}): torch tokens {accepted}; CUDA token {tokens}"


@dataclass(frozen=True)
class Link:
    """One file an index page lists."""

    filename: str
    url: str
    requires_python: str | None = None
    yanked: bool = False


def matches(local: str | None, torch: TorchBuild) -> tuple[bool, bool]:
    """Whether a local version label fits ``torch``, and whether it names a torch version."""
    label = (local or "").lower()
    versions = _TORCH_TOKEN.findall(label)
    if any(v not in torch.torch_tokens() for v in versions):
        return False, bool(versions)
    cuda = [f"cu{digits}" for digits in _CUDA_TOKEN.findall(label)]
    if _CPU_TOKEN.search(label):
        cuda.append("cpu")
    if _ROCM_TOKEN.search(label) or any(token not in torch.cuda_tokens() for token in cuda):
        return False, bool(versions)
    return True, bool(versions)


def choose(
    links: Iterable[Link], distribution: str, torch: TorchBuild, *, specifier: str = "",
    tags: Sequence[Tag], python: str | None = None,
) -> Link | None:
    """Return the wheel of ``distribution`` among ``links`` built for ``torch`` that installs here.

    Args:
        links: What the index pages list.
        distribution: The distribution's name (any spelling).
        torch: The host's torch.
        specifier: The dependency's version specifier (``">=2.7"``), if any.
        tags: This interpreter's tags, most specific first (``packaging.tags.sys_tags()``).
        python: This interpreter's version, for ``data-requires-python``; by default the running one's.

    Returns:
        The best matching link, or None.
    """
    want = canonicalize_name(distribution)
    rank = {tag: index for index, tag in enumerate(tags)}
    running = python or ".".join(map(str, sys.version_info[:3]))
    fitting: list[tuple[Version, bool, int, Link]] = []
    for link in links:
        try:
            name, version, _, wheel_tags = parse_wheel_filename(link.filename)
        except InvalidWheelFilename:
            continue  # an sdist, or not a distribution at all
        if name != want or link.yanked or not _admits(link.requires_python, running):
            continue
        tag = min((rank[tag] for tag in wheel_tags if tag in rank), default=None)
        fits, names_torch = matches(version.local, torch)
        if tag is not None and fits:
            fitting.append((version, names_torch, tag, link))
    allowed = set(SpecifierSet(specifier).filter(version for version, *_ in fitting))
    best = max(
        (item for item in fitting if item[0] in allowed),
        key=lambda item: (Version(item[0].public), item[1], -item[2], item[0], item[3].filename), default=None,
    )  # fmt: skip
    return None if best is None else best[3]


def _admits(requires_python: str | None, running: str) -> bool:
    if not requires_python:
        return True
    try:
        return SpecifierSet(requires_python).contains(running, prereleases=True)
    except InvalidSpecifier:
        return True  # pip and uv ignore a malformed data-requires-python as well


class _Anchors(HTMLParser):
    """The anchors of a PEP 503 page, and its <base href> if it has one."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.anchors: list[tuple[str, str | None, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        href = values.get("href")
        if tag == "base" and href and self.base is None:
            self.base = href
        elif tag == "a" and href:
            self.anchors.append((href, values.get("data-requires-python"), "data-yanked" in values))


def parse_page(html: str, page_url: str) -> list[Link]:
    """The wheel and sdist links of a PEP 503 project page, as absolute URLs.

    A hash fragment (``#sha256=...``) stays on the URL (uv checks the file against it); any
    other fragment is dropped. Only http(s) links are kept, and file links from a file page.
    """
    parser = _Anchors()
    parser.feed(html)
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url
    local = urlsplit(page_url).scheme == "file"
    links = []
    for href, requires_python, yanked in parser.anchors:
        parts = urlsplit(urljoin(base, href))
        if parts.scheme not in ("http", "https") and not (local and parts.scheme == "file"):
            continue
        fragment = parts.fragment if parts.fragment.startswith(_HASHES) else ""
        url = urlunsplit(parts._replace(fragment=fragment))
        filename = unquote(parts.path.rsplit("/", 1)[-1])
        if filename:
            links.append(Link(filename, url, requires_python, yanked))
    return links


def redact(url: str) -> str:
    """``url`` without the password it may carry (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def read_index(index_url: str, distribution: str, *, timeout: float) -> list[Link]:
    """Return what ``<index_url>/<distribution>/`` lists; nothing if the index has no such project.

    Blocks for up to about ``timeout`` seconds per network operation.

    Raises:
        IndexReadError: the page could not be read; the message names the URL and the fix.
    """
    page_url = f"{index_url.rstrip('/')}/{canonicalize_name(distribution)}/"
    parts = urlsplit(page_url)
    if parts.scheme == "file":
        return parse_page(_read_file_page(Path(unquote(parts.path))), page_url)
    headers = {"Accept": "text/html", "User-Agent": "pyisolate"}
    if parts.username is not None:  # urllib does not read credentials out of a URL itself
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    request = urllib.request.Request(urlunsplit(parts), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(_MAX_PAGE_BYTES + 1)
            charset = response.headers.get_content_charset() or "utf-8"
            final = response.geturl()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            return []
        raise IndexReadError(f"{redact(page_url)} answered HTTP {exc.code} ({exc.reason}); check the "
                             "index's address and that this machine may read it") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise IndexReadError(f"cannot read {redact(page_url)} ({reason}); check the index's address and "
                             "that it is reachable from this machine") from None
    if len(body) > _MAX_PAGE_BYTES:
        raise IndexReadError(f"{redact(page_url)} is larger than {_MAX_PAGE_BYTES >> 20} MiB; is it a PEP 503 "
                             "project page?")
    if final == urlunsplit(parts):  # keep the credentials on links relative to the page
        final = page_url
    return parse_page(body.decode(charset, errors="replace"), final)


def _read_file_page(path: Path) -> str:
    """A file:// index: the project folder's index.html (as uv reads it), or nothing."""
    page = path / "index.html" if path.is_dir() else path
    try:
        with open(page, "rb") as handle:
            body = handle.read(_MAX_PAGE_BYTES + 1)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise IndexReadError(f"cannot read {page} ({exc.strerror}); check its permissions") from None
    if len(body) > _MAX_PAGE_BYTES:
        raise IndexReadError(f"{page} is larger than {_MAX_PAGE_BYTES >> 20} MiB; is it a PEP 503 project page?")
    return body.decode("utf-8", errors="replace")


async def cuda_requirements(
    specs: Sequence[str], cuda: CudaWheels, *, extension: str, timeout: float = INDEX_TIMEOUT
) -> list[tuple[str, str]]:
    """Choose the wheel of each of ``specs`` for the host's torch.

    Returns:
        For each, the requirement to install (``name @ url``) and the wheel's file name (which,
        unlike the URL, carries no credentials: for progress and logs).

    Reading the host's torch and the index pages runs in threads, each step within ``timeout``.

    Raises:
        EnvironmentBuildError: the host has no torch, an index cannot be read, or a package has
            no wheel for this host (the message lists the wheels seen and the host's tokens).
    """
    try:
        async with asyncio.timeout(timeout):
            torch = await asyncio.to_thread(TorchBuild.of_host)
    except TimeoutError:
        raise _failed(extension, specs, f"importing the host's torch took longer than {timeout:.0f} s") from None
    if torch is None:
        raise _failed(extension, specs, "cuda_wheels chooses wheels built for the host's torch, and the host has "
                      "no torch; install in the host the torch these wheels are built for, or remove cuda_wheels")
    tags = list(sys_tags())
    chosen = []
    for spec in specs:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not for this platform: uv would skip it too
        distribution = cuda.distribution(requirement.name)
        links: list[Link] = []
        for index in cuda.index_urls:
            try:
                async with asyncio.timeout(timeout):
                    links += await asyncio.to_thread(read_index, index, distribution, timeout=timeout)
            except TimeoutError:
                raise _failed(extension, [spec], f"reading {redact(index)} took longer than {timeout:.0f} s; check "
                              "that the index is reachable from this machine") from None
            except IndexReadError as exc:
                raise _failed(extension, [spec], str(exc)) from None
        link = choose(links, distribution, torch, specifier=str(requirement.specifier), tags=tags)
        if link is None:
            raise _failed(extension, [spec], _no_match(spec, distribution, cuda, torch, links))
        name = parse_wheel_filename(link.filename)[0]
        chosen.append((f"{name} @ {link.url}", link.filename))
    return chosen


def _no_match(spec: str, distribution: str, cuda: CudaWheels, torch: TorchBuild, links: list[Link]) -> str:
    indexes = ", ".join(redact(url) for url in cuda.index_urls)
    seen = sorted({link.filename for link in links})
    shown = ", ".join(seen[:_SHOWN]) + (f" and {len(seen) - _SHOWN} more" if len(seen) > _SHOWN else "")
    python = next(iter(sys_tags()))
    return (f"no wheel of {distribution!r} on {indexes} fits {spec!r} on this host: {torch.describe()}; "
            f"most specific Python tag {python}. Wheels seen: {shown or 'none'}. Add a wheel built for this "
            "torch to the index, or run the host on a torch the index has wheels for")


def _failed(extension: str, packages: Sequence[str], why: str) -> EnvironmentBuildError:
    return EnvironmentBuildError(
        f"cannot build the environment of extension {extension!r}: {why}",
        extension=extension, packages=list(packages), output_tail="",
    )  # fmt: skip
