"""Create and reuse extension venvs with uv.

Layout under ``venv_root``::

    <name>/                     one venv per extension
        .pyisolate-ready.json   written last, only after a successful build
        .pyisolate-used         touched each time the venv is reused (its mtime: last use)
    .locks/<name>.lock          flock held while a venv is checked or built
    .runtime/<hash>/            see pyisolate._envs.runtime

A venv is keyed by a fingerprint of everything that decides its contents, so an unchanged
extension starts without running uv at all. A build reports its steps (``ProgressStep``) as
uv's own output says them, read line by line as uv prints it. This module opens no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .._sources import PackageSources, check_listed
from .._validate import validate_dependencies, validate_extension_name
from ..errors import ConfigError, EnvironmentBuildError
from .locks import exclusive_lock, lock_path
from .uv import install_command, run_uv, uv_binary, uv_version
from .progress import ProgressEvent, ProgressStep, _count, _Emit, _InstallProgress
from .wheels import cuda_requirements

__all__ = ["ensure_venv", "lock_path", "uv_binary", "venv_dir", "with_numpy_for_torch"]

_log = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when the layout changes, so older builds are not reused
_MARKER = ".pyisolate-ready.json"
_USED = ".pyisolate-used"
# Environment variables that change what uv installs, hence part of the fingerprint.
_CONTENT_ENV_VARS = (
    "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_DEFAULT_INDEX", "UV_FIND_LINKS",
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_INDEX_STRATEGY", "UV_CONSTRAINT", "UV_OVERRIDE",
    "UV_EXCLUDE", "UV_PRERELEASE", "UV_RESOLUTION", "UV_EXCLUDE_NEWER",
)  # fmt: skip
# With share_torch the child imports the host's torch, so uv must never resolve its own.
_SHARED_TORCH_PACKAGES = ("torch",)


@functools.cache
def _python() -> str:
    # The running interpreter does not change; resolving its symlinks costs a stat per component.
    return os.path.realpath(sys.executable)


def venv_dir(venv_root: Path, name: str) -> Path:
    """Return the directory of an extension's venv, refusing any path outside ``venv_root``.

    Args:
        venv_root: the directory that holds every extension's venv.
        name: the extension's name.

    Returns:
        ``venv_root / name``.

    Raises:
        ConfigError: the name is invalid or its path would leave ``venv_root``.
    """
    validate_extension_name(name)
    path = Path(venv_root) / name
    root, resolved = Path(venv_root).resolve(), path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ConfigError(f"extension name {name!r} resolves to {resolved}, outside {root}")
    return path


def with_numpy_for_torch(deps: tuple[str, ...]) -> tuple[str, ...]:
    """A share_torch venv's requirements, with numpy unless the extension asks for its own.

    torch's numpy bridge (``tensor.numpy()``, ``torch.from_numpy``) needs numpy importable in
    the worker; without it every worker warns "Failed to initialize NumPy" and ``.numpy()``
    raises. The host's own numpy version is asked for when the host has one (torch works with
    it there); the extension's own numpy requirement, when it has one, wins.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for dep in deps:
        try:
            if canonicalize_name(Requirement(dep).name) == "numpy":
                return deps
        except InvalidRequirement:  # a local path (allow_direct_references): not numpy
            continue
    try:
        return (*deps, f"numpy=={importlib.metadata.version('numpy')}")
    except importlib.metadata.PackageNotFoundError:
        return (*deps, "numpy")


def _fingerprint(dependencies: Sequence[str], *, share_torch: bool, sources: PackageSources | None = None) -> str:
    """Return the sha256 hex digest of everything that decides a venv's contents."""
    facts: dict[str, object] = {
        "layout": _LAYOUT_VERSION,
        "dependencies": list(dependencies),
        "share_torch": share_torch,
        "python_version": sys.version,
        "python": _python(),
        "uv": uv_version(),
        "env": {key: os.environ.get(key) for key in _CONTENT_ENV_VARS},
    }
    if sources:  # absent when unset: venvs built before package sources existed stay valid
        facts["sources"] = sources.as_dict()
        if sources.cuda_wheels is not None:  # the wheels chosen are the ones built for the host's torch
            facts["host_torch"] = _host_torch()
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _host_torch() -> str | None:
    # From metadata, not `import torch`: reusing a venv must stay cheap. A torch's version names
    # its build where it matters (2.13.0+cpu, 2.13.0+cu128).
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_ready(target: Path, fingerprint: str) -> bool:
    """Tell whether the venv was fully built for this fingerprint (and still has its python)."""
    try:
        data = json.loads((target / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    recorded = data.get("fingerprint") if isinstance(data, dict) else None
    return recorded == fingerprint and (target / "bin" / "python").exists()


def _reuse(target: Path, fingerprint: str) -> bool:
    """Whether the venv is ready for ``fingerprint``; if so it is marked as used now."""
    if not _is_ready(target, fingerprint):
        return False
    _touch(target)
    return True


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``ensure_venv`` works out before it builds anything (in a thread: it reads files)."""

    root: Path
    target: Path
    deps: tuple[str, ...]
    sources: PackageSources
    fingerprint: str
    ready: bool  # built for this fingerprint, and marked as used now


def _plan(venv_root: Path, name: str, dependencies: Sequence[str], share_torch: bool,
          allow_direct_references: bool, sources: PackageSources) -> _Plan:
    root = Path(venv_root).absolute()
    target = venv_dir(root, name)
    deps = validate_dependencies(dependencies, allow_direct_references=allow_direct_references)
    if share_torch:
        deps = with_numpy_for_torch(deps)
    _passes(deps, sources)  # a package named there but not among the dependencies: fail before anything
    fingerprint = _fingerprint(deps, share_torch=share_torch, sources=sources)
    return _Plan(root, target, deps, sources, fingerprint, _reuse(target, fingerprint))


def _write_marker(
    target: Path, fingerprint: str, deps: Sequence[str], share_torch: bool, sources: PackageSources
) -> None:
    data: dict[str, object] = {"fingerprint": fingerprint, "dependencies": list(deps), "share_torch": share_torch}
    if sources:
        data["sources"] = sources.as_dict()
    data |= {"python": sys.version, "created": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=".marker-", dir=target)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target / _MARKER)  # a reader sees no marker or a whole one


def _touch(target: Path) -> None:
    """Record that the venv is used now (``pyisolate env list`` and ``env prune`` read it)."""
    path = target / _USED
    try:
        os.utime(path)  # one syscall on the warm path
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError:
        pass  # a read-only venv root still works


#: Where venvs are built before they replace the one in use: ``<root>/.build/<name>@<random>``.
_BUILDS = ".build"


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _name(spec: str) -> str | None:
    try:
        return canonicalize_name(Requirement(spec).name)
    except InvalidRequirement:
        return None  # a local path


def _passes(deps: Sequence[str], sources: PackageSources) -> tuple[list[str], list[str], list[str], list[str]]:
    """Split the requirements into the install passes: the main one, CUDA wheels, without dependencies.

    Returns:
        The three passes' requirements, and the names the main pass must not install even as
        a dependency (the later passes install them).

    Raises:
        ConfigError: a package that cuda_wheels or no_deps names is not among ``deps``.
    """
    cuda = sources.cuda_wheels
    check_listed(cuda.packages if cuda else (), deps, "cuda_wheels.packages")
    check_listed(sources.no_deps, deps, "share_torch_no_deps")
    main: list[str] = []
    wheels: list[str] = []
    loose: list[str] = []
    for spec in deps:
        name = _name(spec)
        (wheels if cuda and name in cuda.packages else loose if name in sources.no_deps else main).append(spec)
    later = [*(cuda.packages if cuda else ()), *(cuda.package_map.values() if cuda else ()), *sources.no_deps]
    return main, wheels, loose, later


async def ensure_venv(
    *,
    venv_root: Path,
    name: str,
    dependencies: Sequence[str],
    share_torch: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
    allow_direct_references: bool = False,
    sources: PackageSources | None = None,
) -> Path:
    """Return the interpreter of the extension's venv, building the venv only if needed.

    Args:
        venv_root: directory holding every extension's venv (created if missing).
        name: the extension's name.
        dependencies: PEP 508 requirements to install into the venv.
        share_torch: the child uses the host's torch; uv never installs its own.
        progress: called with a ProgressEvent at each step (see ProgressStep), from this
            coroutine; a build that reports anything ends with DONE, REUSED or FAILED.
        allow_direct_references: accept ``name @ url`` requirements and local paths.
        sources: where the packages come from (indexes, wheel folders, CUDA wheel indexes) and
            which are installed without their dependencies; by default uv's own (PyPI).

    Returns:
        The absolute path of the venv's ``bin/python``.

    Raises:
        ConfigError: the name or a dependency is invalid, or ``sources`` names a package that
            is not among the dependencies.
        EnvironmentBuildError: uv failed, or no CUDA wheel fits the host; the half-built venv
            has been removed.
    """
    started = time.monotonic()
    final_reported = False

    def emit(step: ProgressStep, detail: str = "", *, packages: int | None = None) -> None:
        nonlocal final_reported
        final_reported = step in (ProgressStep.DONE, ProgressStep.REUSED, ProgressStep.FAILED)
        if progress is not None:
            elapsed = time.monotonic() - started
            progress(ProgressEvent(extension=name, step=step, elapsed=elapsed, detail=detail, packages=packages))

    # Every file this touches (symlinks resolved, the marker read, metadata scanned) is touched
    # in a thread: twenty extensions loading at once must not stall the host's loop.
    plan = await asyncio.to_thread(_plan, venv_root, name, dependencies, share_torch, allow_direct_references,
                                   sources or PackageSources())
    root, target, deps, sources, fingerprint = plan.root, plan.target, plan.deps, plan.sources, plan.fingerprint
    if plan.ready:
        _log.debug("reusing venv of %s at %s", name, target)
        emit(ProgressStep.REUSED)
        return target / "bin" / "python"
    try:
        async with exclusive_lock(root, name, on_wait=lambda: emit(ProgressStep.WAITING)):
            if await asyncio.to_thread(_reuse, target, fingerprint):  # the lock's previous holder built it
                _log.debug("venv of %s was built meanwhile; reusing it", name)
                emit(ProgressStep.REUSED)
                return target / "bin" / "python"
            installed = await _build(target, name, deps, share_torch, sources, fingerprint, emit)
    except BaseException as exc:
        if not final_reported:  # a progress callback that raised has had its final word
            emit(ProgressStep.FAILED, _failure(exc))
        raise
    _log.info("built venv of %s in %.2fs", name, time.monotonic() - started)
    emit(ProgressStep.DONE, _count(installed) if deps else "", packages=installed)
    return target / "bin" / "python"


def _failure(exc: BaseException) -> str:
    """The detail of a FAILED step: uv's output, or what stopped the build."""
    if isinstance(exc, EnvironmentBuildError):
        return exc.output_tail
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


async def _build(
    target: Path,
    name: str,
    deps: tuple[str, ...],
    share_torch: bool,
    sources: PackageSources,
    fingerprint: str,
    emit: _Emit,
) -> int:
    """Build the venv from scratch and return how many packages uv installed.

    Up to three install passes: the requirements with their dependencies (from ``sources``'
    indexes and wheel folders); the CUDA wheels chosen for the host's torch; the requirements
    installed without their dependencies.

    The build happens beside the venv in use (``<root>/.build/<name>@<random>``, a relocatable
    venv) and replaces it only once complete: a worker still running from the old venv (a
    reload with changed dependencies) keeps it while uv works, and keeps it for good if the
    build fails. On any failure or cancellation, what was built is removed.
    """
    staging = await asyncio.to_thread(_staging_dir, target)
    try:
        step = time.monotonic()
        # Always the host's own interpreter: the child shares the host's compiled pyzmq.
        uv = await asyncio.to_thread(uv_binary)  # found once per process, with a few dozen stats
        create = [uv, "venv", "--python", sys.executable, "--relocatable", "--no-config", "--quiet", "--color", "never"]
        await run_uv([*create, str(staging)], name=name, deps=(), on_start=lambda: emit(ProgressStep.CREATING))
        _log.debug("created venv of %s in %.2fs", name, time.monotonic() - step)
        main, wheels, loose, later = _passes(deps, sources)
        shared = _SHARED_TORCH_PACKAGES if share_torch else ()
        options = sources.uv_options()
        installed = 0
        if main:
            excludes = await asyncio.to_thread(_excludes, staging, "main", [*shared, *later])
            installed += await _install(staging, name, main, excludes, options, emit)
        if wheels:
            assert sources.cuda_wheels is not None
            emit(ProgressStep.RESOLVING, "choosing CUDA wheels for " + " ".join(wheels))
            chosen = await cuda_requirements(wheels, sources.cuda_wheels, extension=name)
            installed += await _install(staging, name, [requirement for requirement, _ in chosen], None, (), emit,
                                        no_deps=True, at_fault=wheels, detail=" ".join(f for _, f in chosen))
        if loose:
            excludes = await asyncio.to_thread(_excludes, staging, "no-deps", shared)
            installed += await _install(staging, name, loose, excludes, options, emit, no_deps=True)
        await asyncio.to_thread(_write_marker, staging, fingerprint, deps, share_torch, sources)
        await asyncio.shield(asyncio.to_thread(_swap_in, staging, target))
    except BaseException:
        # In a thread that runs to its end even if this task is cancelled again meanwhile.
        await asyncio.shield(asyncio.to_thread(_remove_tree, staging))
        raise
    return installed


def _staging_dir(target: Path) -> Path:
    """A fresh folder to build ``target``'s venv in, beside it (same file system: it is renamed
    into place); the leftovers of builds of the same venv that were killed are removed first.
    Called under the venv's lock, so no other build of it runs."""
    folder = target.parent / _BUILDS
    folder.mkdir(mode=0o700, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name.startswith(f"{target.name}@"):  # "@" is in no extension name
            _remove_tree(entry)
    return folder / f"{target.name}@{os.urandom(6).hex()}"


def _swap_in(staging: Path, target: Path) -> None:
    """Put the built venv in ``target``'s place; the one it replaces (a stale or half-built one,
    or the one a reloaded worker ran from) goes. A reader sees the old venv, then the new one,
    with no venv for the moment between two renames."""
    old = None
    if os.path.lexists(target):
        old = staging.with_name(staging.name + "-old")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        _remove_tree(old)


def _excludes(target: Path, stem: str, names: Sequence[str]) -> Path | None:
    """A file of package names that uv keeps out of one pass's resolution (``--excludes``)."""
    if not names:
        return None
    path = target / f".pyisolate-excludes-{stem}.txt"
    path.write_text("\n".join(dict.fromkeys(names)) + "\n", encoding="utf-8")
    return path


async def _install(
    target: Path, name: str, deps: Sequence[str], excludes: Path | None, options: Sequence[str], emit: _Emit,
    *, no_deps: bool = False, at_fault: Sequence[str] | None = None, detail: str | None = None,
) -> int:
    """Run one ``uv pip install`` pass into the venv; return how many packages it installed.

    ``at_fault``: the requirements a failure names (by default ``deps``); ``detail``: what the
    progress says is being installed (by default ``deps``).
    """
    step = time.monotonic()
    command = install_command(target / "bin" / "python", deps, excludes, options=options, no_deps=no_deps)
    detail = " ".join(deps) if detail is None else detail
    uv_progress = _InstallProgress(emit)
    await run_uv(command, name=name, deps=deps if at_fault is None else at_fault,
              on_start=lambda: emit(ProgressStep.RESOLVING, detail), on_line=uv_progress)  # fmt: skip
    _log.debug("installed %s into %s in %.2fs", detail, name, time.monotonic() - step)
    return uv_progress.installed
