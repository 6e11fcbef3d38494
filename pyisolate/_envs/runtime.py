"""The runtime a worker imports from the host: pyisolate, zmq and msgpack, as symlinks.

``venv_root/.runtime/<hash>/`` holds symlinks to the host's own files: byte-identical, no
copy per venv, and nothing else from the host's site-packages. The worker's bootstrap
appends it to the END of ``sys.path``, so the venv's own packages come first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["runtime_dir"]

_log = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when the layout changes
_RUNTIME_DISTRIBUTIONS = {"pyzmq": "zmq", "msgpack": "msgpack"}  # distribution -> import name


def runtime_dir(venv_root: Path, share_torch: bool = False, tracing: bool = False) -> Path:
    """Return a directory of symlinks to the host's pyisolate, zmq and msgpack; build it once.

    With ``share_torch`` it also links the host's torch and the distributions torch requires
    (its family), so that a child imports the very files of the host's torch. With
    ``tracing`` it links OpenTelemetry's SDK and what it requires (the API among them), which
    a worker imports to make its spans (``ExtensionManagerConfig.tracing``).

    Appended to the END of a child's ``sys.path``, it gives the child these byte-identical
    host files, with no copy per venv, and nothing else from the host's site-packages.

    Args:
        venv_root: directory holding every extension's venv.

    Returns:
        The absolute path ``venv_root/.runtime/<hash>``.

    Raises:
        RuntimeError: a runtime package cannot be located in the host.
        OSError: the directory could not be written.
    """
    links, digest = _links(share_torch, tracing)
    parent = Path(venv_root).absolute() / ".runtime"
    final = parent / digest
    if final.is_dir():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        for relative, source in links:
            link = tmp / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process won the race; its directory is the same
            return final
        raise
    _log.debug("built runtime directory %s", final)
    return final


#: (share_torch, tracing) -> (listing stamp, links, digest), computed once per process and listing.
_known: dict[tuple[bool, bool], tuple[tuple[str, int], list[tuple[str, str]], str]] = {}


def _listing_stamp() -> tuple[str, int]:
    """Where pyisolate is, and when its listing last changed.

    An editable install links each entry of the package, so a module added to it needs new links.
    """
    package = _package_dir("pyisolate")
    return str(package), os.stat(package).st_mtime_ns


def _links(share_torch: bool, tracing: bool = False) -> tuple[list[tuple[str, str]], str]:
    """Return the runtime's links and their digest, scanning the metadata once per listing.

    The runtime packages and torch's family do not change under a running host; only an
    editable install's listing can (see _listing_stamp).
    """
    stamp = _listing_stamp()
    known = _known.get((share_torch, tracing))
    if known is not None and known[0] == stamp:
        return known[1], known[2]
    links = _runtime_links()
    families = ([torch_family()] if share_torch else []) + ([family("opentelemetry-sdk")] if tracing else [])
    names = {name for name, _ in links}
    for entries in families:
        for path in entries:
            if path.name not in names:  # a namespace package (opentelemetry) comes from several
                names.add(path.name)
                links.append((path.name, str(path)))
    digest = hashlib.sha256(json.dumps([_LAYOUT_VERSION, links]).encode()).hexdigest()[:16]
    _known[(share_torch, tracing)] = (stamp, links, digest)
    return links, digest


def _runtime_links() -> list[tuple[str, str]]:
    """Return (path inside the runtime dir, absolute source) for every shared entry."""
    package = _package_dir("pyisolate")
    broker, workers = _package_dir("pyisolate.broker"), _package_dir("pyisolate.workers")
    if all(p.resolve() == (package / p.name).resolve() for p in (broker, workers)):
        links = [("pyisolate", str(package))]
    else:
        # Editable install: broker/ and workers/ live beside pyisolate/, not inside it. The
        # listing is part of the hash, so a new module in pyisolate/ makes a new runtime dir.
        links = [
            (f"pyisolate/{entry}", str(package / entry))
            for entry in sorted(os.listdir(package))
            if entry not in ("__pycache__", "broker", "workers")
        ]
        links += [("pyisolate/broker", str(broker)), ("pyisolate/workers", str(workers))]
    for dist_name, import_name in _RUNTIME_DISTRIBUTIONS.items():
        links += [(path.name, str(path)) for path in _distribution_entries(dist_name, import_name)]
    return links


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot locate package {module!r} in the host")
    return Path(spec.submodule_search_locations[0]).absolute()


def _distribution_entries(dist_name: str, import_name: str) -> list[Path]:
    """Return the top-level site-packages entries of a distribution (zmq, pyzmq.libs)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return [_package_dir(import_name)]
    if not dist.files:  # no RECORD: fall back to the import package alone
        return [_package_dir(import_name)]
    base = Path(str(dist.locate_file(""))).absolute()
    tops = {file.parts[0] for file in dist.files if file.parts}
    tops -= {"..", "__pycache__"}  # ../ entries are scripts in bin/
    tops = {top for top in tops if not top.endswith((".dist-info", ".egg-info", ".data"))}
    return [base / top for top in sorted(tops) if os.path.lexists(base / top)]


def torch_family() -> list[Path]:
    """Top-level site-packages entries of the host's torch and of everything it requires.

    Raises:
        RuntimeError: torch is not installed in the host.
    """
    try:
        importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("share_torch=True, but torch is not installed in the host") from None
    return family("torch")


def family(root: str) -> list[Path]:
    """Top-level site-packages entries of the host's distribution ``root`` and of everything it
    requires (without extras), as far as they are installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [root]
    entries: list[Path] = []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement the host does not have
        entries += _distribution_entries(name, name.replace("-", "_"))
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return entries
