"""``pyisolate env list|build|repair|prune``: the venv commands of the command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._config import ExtensionConfig
from .._discovery import ENTRY_POINT_GROUP, extension_dirs
from .._envs import ProgressDisplay, ProgressStep, ensure_venv, runtime_dir
from .._envs import inventory as _envs
from .._manifest import MANIFEST, default_name
from .._sources import PackageSources
from .._validate import validate_extension_name
from ..errors import ConfigError, EnvironmentBuildError
from .doctor import nearest_existing, size
from .output import EXIT_FAILED, EXIT_OK, UsageError, error, print_json

__all__ = ["COMMANDS"]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def _ago(timestamp: float) -> str:
    seconds = max(time.time() - timestamp, 0)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"


def _require_root(root: Path) -> None:
    if not _envs.looks_like_root(root):
        raise UsageError(f"{root} does not look like a pyisolate venv root (no .locks, .runtime or built "
                         "venv in it); pass the right one with --venv-root DIR or set PYISOLATE_VENV_ROOT")


def _root_is_a_directory(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Refuse (exit code 2) a venv root that is, or lies under, something other than a directory."""
    def checked(args: argparse.Namespace) -> int:
        root: Path = args.venv_root
        existing = nearest_existing(root)
        if not existing.is_dir():
            where = "" if existing == root else f" ({existing} is not one)"
            raise UsageError(f"venv root {root}: not a directory{where}; pass the right one with --venv-root "
                             "DIR or set PYISOLATE_VENV_ROOT")
        return run(args)

    return checked


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.exists():
        raise UsageError(f"{text}: no such file or directory")
    return path


# -- list ----------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    venvs = _envs.list_venvs(args.venv_root)
    if args.json:
        print_json({"venv_root": str(args.venv_root), "venvs": [{
            "name": v.name, "path": str(v.path), "status": v.status, "dependencies": list(v.dependencies),
            "share_torch": v.share_torch, "size_bytes": v.size_bytes, "last_used": _iso(v.last_used),
            "created": _iso(v.created),
        } for v in venvs]})  # fmt: skip
        return EXIT_OK
    if not venvs:
        print(f"no venvs under {args.venv_root}")
        return EXIT_OK
    rows = [("NAME", "STATUS", "SIZE", "LAST USED", "DEPENDENCIES")]
    rows += [(v.name, v.status, size(v.size_bytes), _ago(v.last_used),
              " ".join(v.dependencies) + (" (shares torch)" if v.share_torch else "") or "-") for v in venvs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    print(f"{len(venvs)} venv(s) under {args.venv_root}, {size(sum(v.size_bytes for v in venvs))} in all")
    return EXIT_OK


# -- build and repair ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One venv to build: from an extension's config, or from what a venv's last build recorded."""
    name: str
    directory: str | None
    dependencies: tuple[str, ...]
    share_torch: bool = False
    allow_direct_references: bool = False
    isolated: bool = True
    sources: PackageSources = PackageSources()

    @classmethod
    def of(cls, config: ExtensionConfig) -> _Job:
        return cls(config.name, str(config.module_path), tuple(config.dependencies), config.share_torch,
                   config.allow_direct_references, config.isolated, config.sources)


async def _build_one(config: _Job, root: Path, display: Callable[[Any], None]) -> dict[str, Any]:
    started = time.monotonic()
    steps: list[str] = []
    result: dict[str, Any] = {"name": config.name, "directory": config.directory, "venv": None}

    def progress(event: Any) -> None:
        steps.append(event.step)
        display(event)

    if not config.isolated:
        return result | {"status": "skipped", "seconds": 0.0, "error": "isolated = false: it needs no venv"}
    try:
        python = await ensure_venv(
            venv_root=root, name=config.name, dependencies=config.dependencies, share_torch=config.share_torch,
            allow_direct_references=config.allow_direct_references, sources=config.sources, progress=progress,
        )  # fmt: skip
        await asyncio.to_thread(runtime_dir, root, config.share_torch)
    except (ConfigError, EnvironmentBuildError, OSError, RuntimeError) as exc:
        return result | {"status": "failed", "seconds": round(time.monotonic() - started, 3), "error": str(exc)}
    status = "reused" if ProgressStep.REUSED in steps else "built"
    return result | {"status": status, "venv": str(python.parent.parent),
                     "seconds": round(time.monotonic() - started, 3), "error": None}


def _build_all(configs: list[_Job], root: Path) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_build_one(c, root, display) for c in configs)))

    with ProgressDisplay() as display:  # on stderr: stdout stays for the result
        return asyncio.run(run())


def _report(args: argparse.Namespace, results: list[dict[str, Any]]) -> int:
    ok = all(r["status"] != "failed" for r in results)
    if args.json:
        print_json({"venv_root": str(args.venv_root), "ok": ok, "extensions": results})
    else:
        for r in results:
            where = r["venv"] or r["directory"]
            line = f"{r['status']:<8} {r['name'] or '?'}  ({r['seconds']:.1f} s)  {where}"
            print(line if r["error"] is None or r["status"] == "skipped" else f"{line}\n         {r['error']}")
    return EXIT_OK if ok else EXIT_FAILED


def _known_name(directory: Path) -> str | None:
    """The name of an extension whose manifest is invalid, where what it says about the name can
    still be read: as ExtensionConfig.from_path() would name it, else None."""

    if not directory.is_dir():
        return None
    try:
        manifest = tomllib.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).is_file() else {}
        tool, project = manifest.get("tool", {}).get("pyisolate", {}), manifest.get("project", {})
        name = tool["name"] if "name" in tool else default_name(project.get("name") or directory.name)
        return validate_extension_name(name)
    except (OSError, ValueError, AttributeError, TypeError, ConfigError):  # unreadable TOML, names of no type
        return None


def _configs(directories: list[Path]) -> tuple[list[_Job], list[dict[str, Any]]]:
    configs, failures = [], []
    for directory in directories:
        try:
            configs.append(ExtensionConfig.from_path(directory))
        except ConfigError as exc:
            failures.append({"name": _known_name(directory), "directory": str(directory), "venv": None,
                             "status": "failed", "seconds": 0.0, "error": str(exc)})
    names: dict[str, int] = {}
    for config in configs:
        names[config.name] = names.get(config.name, 0) + 1
    for config in [c for c in configs if names[c.name] > 1]:
        failures.append({"name": config.name, "directory": str(config.module_path), "venv": None,
                         "status": "failed", "seconds": 0.0,
                         "error": f"another of these extensions is also named {config.name!r}; rename one"})
    return [_Job.of(c) for c in configs if names[c.name] == 1], failures


def _build(args: argparse.Namespace) -> int:
    directories = [_existing_dir(d) for d in args.directories]
    configs, failures = _configs(directories)
    return _report(args, failures + _build_all(configs, args.venv_root))


def _repair(args: argparse.Namespace) -> int:
    root: Path = args.venv_root
    target: str = args.target
    looks_like_path = "/" in target or target.startswith(".")
    info = None
    if not looks_like_path and _envs.looks_like_root(root):
        info = next((v for v in _envs.list_venvs(root) if v.name == target), None)
    if info is not None:
        if info.status == _envs.INCOMPLETE:
            error(f"venv {target!r} records no dependencies (its build never finished); rebuild it from the "
                  f"extension's directory: pyisolate env repair DIR")
            return EXIT_FAILED
        # allow_direct_references: these requirements were accepted when the venv was built.
        job = _Job(target, None, info.dependencies, info.share_torch, allow_direct_references=True,
                   sources=info.sources)
    else:
        path = Path(target).expanduser().absolute()
        if not path.is_dir():
            raise UsageError(f"{target!r} is neither a venv under {root} (see pyisolate env list) nor an "
                             "extension directory")
        jobs, failures = _configs([path])
        if failures:
            return _report(args, failures)
        job = jobs[0]
    existing = root / job.name
    if existing.is_dir() and not existing.is_symlink():
        try:
            _envs.remove_venv(root, job.name)
        except (_envs.VenvBusyError, OSError) as exc:
            error(f"cannot remove venv {job.name!r}: {exc}")
            return EXIT_FAILED
    return _report(args, _build_all([job], root))


# -- prune ---------------------------------------------------------------------------------


def _kept_names(directories: list[Path]) -> set[str]:
    names = {point.name for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    problems = []
    for directory in directories:
        folders = [directory] if any((directory / m).is_file() for m in ("__init__.py", "pyproject.toml")) \
            else extension_dirs(directory)
        for folder in folders:
            try:
                names.add(ExtensionConfig.from_path(folder).name)
            except ConfigError as exc:  # every one, so that one run shows all there is to fix
                problems.append(f"  {exc}")  # it names the folder or its manifest
    if problems:
        raise ConfigError("cannot tell which venvs these extensions under --keep use; fix them, or leave them "
                          "out of --keep:\n" + "\n".join(problems))
    return names


def _prune(args: argparse.Namespace) -> int:
    root: Path = args.venv_root
    if not args.keep and args.older_than is None:
        raise UsageError("say which venvs to remove: --keep DIR... (those no extension there uses) and/or "
                         "--older-than DAYS (those unused that long)")
    _require_root(root)
    try:
        keep = _kept_names([_existing_dir(d) for d in args.keep])
    except ConfigError as exc:
        error(str(exc))
        return EXIT_FAILED
    report: dict[str, Any] = {"venv_root": str(root), "dry_run": args.dry_run, "removed": [], "kept": [],
                              "skipped": [], "failed": [], "freed_bytes": 0}
    for info in _envs.list_venvs(root):
        if args.keep and info.name in keep:
            report["kept"].append({"name": info.name, "reason": "used by a kept extension"})
            continue
        if args.older_than is not None and _envs.age_days(info) < args.older_than:
            report["kept"].append({"name": info.name, "reason": f"used {_ago(info.last_used)}"})
            continue
        try:
            if not args.dry_run:
                _envs.remove_venv(root, info.name)
        except _envs.VenvBusyError as exc:
            report["skipped"].append({"name": info.name, "reason": str(exc)})
            continue
        except OSError as exc:
            report["failed"].append({"name": info.name, "error": str(exc)})
            continue
        report["removed"].append({"name": info.name, "path": str(info.path), "size_bytes": info.size_bytes,
                                  "last_used": _iso(info.last_used)})
        report["freed_bytes"] += info.size_bytes
    for leftover in _envs.trash(root):
        if not args.dry_run:
            shutil.rmtree(leftover, ignore_errors=True)
    ok = not report["skipped"] and not report["failed"]
    if args.json:
        print_json(report)
        return EXIT_OK if ok else EXIT_FAILED
    verb = "would remove" if args.dry_run else "removed"
    for entry in report["removed"]:
        print(f"{verb:<12} {entry['name']}  ({size(entry['size_bytes'])})")
    for entry in report["kept"]:
        print(f"{'kept':<12} {entry['name']}  ({entry['reason']})")
    for entry in report["skipped"]:
        print(f"{'skipped':<12} {entry['name']}  ({entry['reason']})")
    for entry in report["failed"]:
        print(f"{'failed':<12} {entry['name']}  ({entry['error']})")
    print(f"{verb} {len(report['removed'])} venv(s), {size(report['freed_bytes'])}")
    return EXIT_OK if ok else EXIT_FAILED


# -- the table the parser is built from -----------------------------------------------------


def _configure_list(parser: argparse.ArgumentParser, days: Any) -> None:
    pass


def _configure_build(parser: argparse.ArgumentParser, days: Any) -> None:
    parser.add_argument("directories", nargs="+", metavar="DIR", help="an extension's directory")


def _configure_repair(parser: argparse.ArgumentParser, days: Any) -> None:
    parser.add_argument("target", metavar="NAME|DIR",
                        help="a venv's name (see env list) or an extension's directory (its manifest decides)")


def _configure_prune(parser: argparse.ArgumentParser, days: Any) -> None:
    parser.add_argument("--keep", nargs="+", default=[], metavar="DIR",
                        help="extension directories, or directories of extensions, whose venvs stay "
                             "(extensions advertised by installed entry points always stay)")
    parser.add_argument("--older-than", type=days, metavar="DAYS", help="remove only venvs unused for DAYS days")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser, Any], None],
                          Callable[[argparse.Namespace], int]]] = {
    "list": ("list the venvs: extension, dependencies, size, last use",
             "List every venv under the venv root: its extension's name, status (ready; stale: the next "
             "load rebuilds it; incomplete: a build was interrupted), size on disk, when it was last used "
             "(built or reused by a host), and its dependencies.", _configure_list, _root_is_a_directory(_list)),
    "build": ("build the venvs of extension directories, starting nothing",
              "Build (or find up to date) the venv of each extension directory, as its pyproject.toml "
              "says, with a progress line per extension. Exit code 1 when any build fails.",
              _configure_build, _root_is_a_directory(_build)),
    "repair": ("rebuild one venv from scratch",
               "Remove a venv and build it again: by NAME from what its last build recorded, or from an "
               "extension's DIR and its manifest. Refuses while a process runs from the venv.",
               _configure_repair, _root_is_a_directory(_repair)),
    "prune": ("remove venvs no extension uses",
              "Remove the venvs that no extension under --keep uses, and/or that were unused for "
              "--older-than DAYS (both given: only venvs that are both). Never touches anything outside "
              "the venv root, never follows symlinks, skips venvs a process runs from or a build holds. "
              "Exit code 1 when a venv that should go could not be removed.", _configure_prune,
              _root_is_a_directory(_prune)),
}
