"""ExtensionManagerConfig and ExtensionConfig: frozen, validated at construction."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._manifest import Manifest, default_name, read_manifest
from ._limits import Limits
from ._policy import SandboxMode, SandboxPolicy, check_mode
from ._singleton import ProxiedSingleton
from ._upstream import check_upstream_keys
from ._curve import CurveConfig
from ._placement import RayPlacement
from ._sources import CudaWheels, PackageSources, Where, check_find_links, check_listed, check_names, check_url
from ._validate import validate_dependencies, validate_extension_name
from .errors import ConfigError

if TYPE_CHECKING:
    from ._envs import ProgressEvent

__all__ = ["ExtensionConfig", "ExtensionManagerConfig", "RestartPolicy"]


def _positive(owner: str, name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{owner}.{name} must be a positive number of seconds, got {value!r}")


#: The confinement mechanisms a host may layer (``ExtensionManagerConfig.sandbox_backends``).
BACKENDS = ("landlock", "bwrap")


def _backends(value: object) -> tuple[str, ...]:
    """Return ``value`` as a tuple of distinct backend names, or raise ConfigError saying how to fix it."""
    where = "ExtensionManagerConfig.sandbox_backends"
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a tuple of backend names, got {value!r}; write ({value!r},)")
    for name in value:
        if name not in BACKENDS:
            raise ConfigError(f"{where}: unknown backend {name!r}; choose from {', '.join(map(repr, BACKENDS))}")
    if not value:
        raise ConfigError(f"{where} is empty; name at least one of {', '.join(map(repr, BACKENDS))}, or set "
                          "sandbox_mode='disabled' to run workers unconfined")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where} names a backend twice ({value!r}); list each once")
    return tuple(value)


def _host_site_dirs() -> set[str]:
    """The host interpreter's package directories (site-packages, dist-packages), resolved."""
    import site
    import sysconfig

    found = [*site.getsitepackages(), site.getusersitepackages()]
    for base in {sys.prefix, sys.base_prefix}:
        found += site.getsitepackages([base])
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
        found += [paths["purelib"], paths["platlib"]]
    return {os.path.realpath(path) for path in found}


def _host_paths(value: object, where: str, owner: str = "") -> tuple[Path, ...]:
    """``value`` as existing absolute directories that hold none of the host's installed packages.

    ``where`` names the field, ``owner`` (`` (extension 'x')``) whose it is, in messages.
    """
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}{owner} must be a list of directories, got {value!r}; write [{value!r}]")
    found: dict[Path, None] = {}
    for index, item in enumerate(value):
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            raise ConfigError(f"{where}[{index}]{owner} must be a directory path, got {item!r}")
        path = Path(os.path.normpath(Path(item).expanduser().absolute()))
        if not path.is_dir():
            problem = "is not a directory" if path.exists() else "does not exist"
            raise ConfigError(f"{where}[{index}]{owner}: {str(path)!r} {problem}; list the folder that holds the "
                              "host modules the extension imports (the folder the host itself has on sys.path)")
        if path.name in ("site-packages", "dist-packages") or os.path.realpath(path) in _host_site_dirs():
            raise ConfigError(
                f"{where}[{index}]{owner}: {str(path)!r} is a package directory (site-packages): that would hand "
                "the worker every package installed there, in place of its own venv's; share what it needs with "
                "share_torch or dependencies, or list the application's own source root instead"
            )
        found[path] = None
    return tuple(found)


def _count(name: str, value: object, least: int, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ConfigError(f"ExtensionManagerConfig.{name} must be an int from {least} to {most}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ExtensionManagerConfig:
    """Settings shared by every extension of one manager.

    Args:
        venv_root_path: Folder that holds one virtual environment per extension.
        on_progress: Called with a ``ProgressEvent`` at each step of an environment build
            (check, reuse, create, install, done, failed); runs on the host's event loop.
        start_timeout: Seconds a worker may take from launch to ready (venv build excluded).
        stop_timeout: Seconds each rung of the stop ladder waits (ask, SIGTERM, SIGKILL).
        call_timeout: Default seconds a call from the host may take before it fails with
            ``CallTimeoutError`` (None: no limit); ``await ext.method(...).timeout(s)`` overrides it.
        max_in_flight: Calls one actor (the host, a singleton, an extension) may have open at
            another at once; further callers wait for a slot (backpressure). Every actor also
            refuses a caller that has more than this many calls open with it.
        max_message_size: Largest message, in bytes (body plus buffers), that travels between
            actors; a larger value fails with ``MessageTooLargeError`` where it is sent, and a
            larger frame from a worker is never even allocated by the host. Large arrays and
            tensors travel through shared memory and do not count.
        max_queued_bytes: Bytes the broker may hold back, all together, for extensions that
            read slower than they are sent to (and each worker for a host that is not
            reading); past it, new work fails with ``QueueFullError``.
        heartbeat_interval: Seconds between liveness pings to each ready worker.
        heartbeat_timeout: A worker whose ping stays unanswered this long (stuck in C code
            holding the GIL, or its event loop blocked) is killed, and its calls fail with
            ``ExtensionCrashedError``.
        loop_block_warning: Log a warning, with the blocking stack, when the host's event
            loop is blocked this many seconds; None turns the watchdog off.
        sandbox_mode: ``"preferred"`` (confine every worker as far as this machine can, and
            say once what it cannot), ``"required"`` (refuse to start a worker that cannot be
            fully confined) or ``"disabled"``, or the same as a ``SandboxMode`` (stored as the
            string); an extension may only make its own stricter.
        sandbox_backends: The mechanisms that confine workers, layered: ``"landlock"`` (Landlock,
            seccomp and dropped capabilities, applied by the worker to itself; needs no
            namespaces) and ``"bwrap"`` (bubblewrap: the worker in namespaces of its own, seeing
            only the paths it is granted, its own processes and, without network, only its own
            loopback; it also closes the same-user unix sockets Landlock leaves open). Where one
            cannot run, ``preferred`` says so once and confines with the rest, ``required``
            refuses to start the worker. Under ``"bwrap"`` a worker sees itself as pid 2 and its
            ``HOME`` and ``TMPDIR`` are its private ``/tmp``; a tcp:// broker (a libzmq without
            ipc) cannot be reached from it without network.
        sandbox: What confined workers may reach (``SandboxPolicy`` or a mapping with its keys);
            the default denies the network and every path but their own. Each extension's
            ``sandbox`` may only narrow it.
        limits: Resources each worker may use (``Limits`` or a mapping, e.g.
            ``{"memory": "4GiB", "cpu": 1.5}``); None: none. A ceiling for every extension's own.
        types: The application's own types, as ``"module:function"`` (or the function itself):
            a function that takes a ``pyisolate.TypeRegistry`` and registers them. The host runs
            it when the manager is made; every worker imports the module by name and runs it
            before any extension code, with the module's root folder (where its top package
            lives) on its ``sys.path`` after its own packages, readable and never writable. None:
            no registered types.
        host_paths: Folders of the host application whose modules every extension may import
            (the app's own source root, say): appended to each worker's ``sys.path`` after its
            venv's packages and pyisolate's runtime, and readable, never writable, under the
            sandbox. Each must exist and must not be a site-packages folder. Default: none, the
            worker sees only its venv and what ``share_torch`` shares.
        fork_server: Fork share_torch workers from one process that imported torch once (a
            "zygote"), instead of spawning each: they start in a fraction of the time and share
            torch's memory. Default True; the environment variable ``PYISOLATE_FORK_SERVER=0``
            also turns it off. An extension is still spawned where the fork server cannot serve
            it: under bwrap, with a venv that has its own copy of a package the fork server
            imported (torch's family, zmq, msgpack), or once the fork server has failed (with one
            warning). See the sandbox guide for how a forked worker is confined.
        tracing: Make an OpenTelemetry span of every call, where it is made and where it runs,
            with the trace context in the call's header, so one trace follows a call from the
            host through extensions and singletons; workers send their spans to the host, which
            exports them through the application's TracerProvider. Needs the ``otel`` extra
            (``pip install 'pyisolate[otel]'``). Default False: no span, and call headers are
            byte for byte those of a host without tracing. See the tracing guide.
        stats: Count every call the host makes to each extension (calls, errors by type,
            latency percentiles per method, bytes), read with ``manager.stats()`` and
            ``pyisolate.stats(ext)``: a few counter updates per call. False counts nothing per
            call (state, in-flight calls, memory and CPU time are still reported).
        admin: Serve the admin endpoint that ``pyisolate top``, ``stack`` and ``profile`` attach
            to: a unix socket in the host's private 0700 directory, answering only processes of
            the same user (checked by SO_PEERCRED). Default off; the environment variable
            ``PYISOLATE_ADMIN=1`` also turns it on. See the observability guide.
        watch: Reload every isolated extension when a file in its module directory changes
            (see ``ExtensionConfig.watch``, which overrides it per extension); needs the
            ``watch`` extra (``pip install 'pyisolate[watch]'``). Default False.
        reload_drain_timeout: Seconds a reload lets calls already running on the old worker
            finish before it stops that worker (those still running then fail with
            ``ExtensionReloadedError``).
        listen: Also accept remote workers (``ExtensionConfig.remote``) on this tcp endpoint,
            e.g. ``"tcp://0.0.0.0:5555"`` (port ``*``: any free one, see
            ``manager.listen_endpoint``). Needs ``curve``: there is no unauthenticated tcp.
        curve: The host's CURVE key pair and the allowlist of worker public keys, each bound to
            one extension name (``CurveConfig`` or a mapping of its fields). See
            docs/guides/remote.md.
    """

    venv_root_path: str | os.PathLike[str]
    on_progress: Callable[[ProgressEvent], None] | None = None
    start_timeout: float = 60.0
    stop_timeout: float = 5.0
    call_timeout: float | None = None
    max_in_flight: int = 512
    max_message_size: int = 256 * 1024 * 1024
    max_queued_bytes: int = 1024 * 1024 * 1024
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    loop_block_warning: float | None = 1.0
    sandbox_mode: str | SandboxMode = "preferred"
    sandbox_backends: tuple[str, ...] = ("landlock",)
    sandbox: SandboxPolicy | Mapping[str, Any] = field(default_factory=SandboxPolicy)
    limits: Limits | Mapping[str, Any] | None = None
    types: str | Callable[[Any], None] | None = None
    host_paths: Sequence[str | os.PathLike[str]] = ()
    fork_server: bool = True
    shm_pool_bytes: int | None = None
    tracing: bool = False
    stats: bool = True
    admin: bool = False
    watch: bool = False
    reload_drain_timeout: float = 30.0
    listen: str | None = None
    curve: CurveConfig | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", _types_reference(self.types))
        _check_listen(self)
        if not isinstance(self.tracing, bool):
            raise ConfigError(f"ExtensionManagerConfig.tracing must be True or False, got {self.tracing!r}")
        root = self.venv_root_path
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ConfigError(
                f"ExtensionManagerConfig.venv_root_path must be a folder path, got {root!r}"
            )
        path = Path(root).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"ExtensionManagerConfig.venv_root_path {str(path)!r} exists and is not a folder")
        object.__setattr__(self, "venv_root_path", path)
        if self.on_progress is not None and not callable(self.on_progress):
            raise ConfigError("ExtensionManagerConfig.on_progress must be a callable or None")
        _positive("ExtensionManagerConfig", "start_timeout", self.start_timeout)
        _positive("ExtensionManagerConfig", "stop_timeout", self.stop_timeout)
        _positive("ExtensionManagerConfig", "loop_block_warning", self.loop_block_warning, optional=True)
        _positive("ExtensionManagerConfig", "call_timeout", self.call_timeout, optional=True)
        _positive("ExtensionManagerConfig", "heartbeat_interval", self.heartbeat_interval)
        _count("max_in_flight", self.max_in_flight, 1, 65536)
        _count("max_message_size", self.max_message_size, 1024, 2**40)
        _count("max_queued_bytes", self.max_queued_bytes, self.max_message_size, 2**62)
        if self.shm_pool_bytes is not None:
            _count("shm_pool_bytes", self.shm_pool_bytes, 0, 2**50)
        _positive("ExtensionManagerConfig", "heartbeat_timeout", self.heartbeat_timeout)
        object.__setattr__(self, "sandbox_mode", check_mode(self.sandbox_mode, "ExtensionManagerConfig.sandbox_mode"))
        object.__setattr__(self, "sandbox_backends", _backends(self.sandbox_backends))
        if self.sandbox is None:
            raise ConfigError("ExtensionManagerConfig.sandbox cannot be None; to run workers unconfined, set "
                              "sandbox_mode='disabled'")
        object.__setattr__(self, "sandbox", SandboxPolicy.parse(self.sandbox, "ExtensionManagerConfig.sandbox"))
        object.__setattr__(self, "limits", Limits.parse(self.limits, where="ExtensionManagerConfig.limits"))
        object.__setattr__(self, "host_paths", _host_paths(self.host_paths, "ExtensionManagerConfig.host_paths"))
        if not isinstance(self.fork_server, bool):
            raise ConfigError(f"ExtensionManagerConfig.fork_server must be True or False, got {self.fork_server!r}")
        for flag in ("stats", "admin"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"ExtensionManagerConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.watch, bool):
            raise ConfigError(f"ExtensionManagerConfig.watch must be True or False, got {self.watch!r}")
        _positive("ExtensionManagerConfig", "reload_drain_timeout", self.reload_drain_timeout)

    @property
    def uses_fork_server(self) -> bool:
        """``fork_server``, unless the environment variable ``PYISOLATE_FORK_SERVER`` is ``0``."""
        return self.fork_server and os.environ.get("PYISOLATE_FORK_SERVER", "1").strip() not in ("0", "false", "no")

    @property
    def uses_admin(self) -> bool:
        """``admin``, or the environment variable ``PYISOLATE_ADMIN`` set to ``1``."""
        return self.admin or os.environ.get("PYISOLATE_ADMIN", "").strip() in ("1", "true", "yes")

    @property
    def venv_root(self) -> Path:
        """``venv_root_path`` as an absolute Path."""
        return Path(self.venv_root_path)


_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _types_reference(value: object) -> str | None:
    """``ExtensionManagerConfig.types`` as ``"module:function"``, or ConfigError saying how to write it."""
    where = "ExtensionManagerConfig.types"
    if value is None:
        return None
    if callable(value) and not isinstance(value, str):
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
        if not isinstance(module, str) or module == "__main__" or "<" in qualname:
            raise ConfigError(f"{where}: {value!r} must be a module-level function of an importable module (workers "
                              "import it by name; a script's __main__ or a nested function cannot be); move it into "
                              "a module of your application")
        return f"{module}:{qualname}"
    if not isinstance(value, str) or not _REFERENCE.fullmatch(value):
        raise ConfigError(f"{where} must be 'module:function' (e.g. 'myapp.isolation:register_types') or that "
                          f"function, got {value!r}")
    if value.startswith("__main__:"):
        raise ConfigError(f"{where}: {value!r} names the host's script, which workers cannot import; move the "
                          "function into a module of your application")
    return value


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """Restart a crashed extension, at most ``max_restarts`` times within ``within`` seconds.

    Past that (Erlang/OTP's intensity rule) the extension is marked failed and stays failed
    until it is stopped and loaded again. Calls pending when it crashed fail with
    ``ExtensionCrashedError``: delivery is at-most-once, a call is never replayed.

    Args:
        max_restarts: Restarts allowed within the window.
        within: The window, in seconds.
        backoff: Seconds before the first restart; doubled for each restart in the window.
        max_backoff: The longest wait before a restart.
        calls_during_restart: ``"wait"`` (calls wait for the restarted extension) or
            ``"fail"`` (they fail at once with the crash error).
    """

    max_restarts: int = 3
    within: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 10.0
    calls_during_restart: str = "wait"

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 1:
            raise ConfigError(f"RestartPolicy.max_restarts must be a positive int, got {self.max_restarts!r}")
        _positive("RestartPolicy", "within", self.within)
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)) or self.backoff < 0:
            raise ConfigError(f"RestartPolicy.backoff must be seconds (>= 0), got {self.backoff!r}")
        _positive("RestartPolicy", "max_backoff", self.max_backoff)
        if self.calls_during_restart not in ("wait", "fail"):
            raise ConfigError(
                f"RestartPolicy.calls_during_restart must be 'wait' or 'fail', got {self.calls_during_restart!r}"
            )


@dataclass(frozen=True, kw_only=True)
class ExtensionConfig:
    """One extension: where its code is and what its environment holds.

    Args:
        name: Unique name; also its actor name on the broker and its venv's folder name.
        module_path: The extension's package directory (with ``__init__.py``) or ``.py`` file.
        isolated: False loads it into the host process itself (no venv, no worker), for
            debugging and trusted code; values are then passed by reference, not copied.
        dependencies: PEP 508 requirements installed into its venv with uv.
        apis: ProxiedSingleton classes of the host that the extension may call.
        share_torch: The extension imports the host's own torch (byte-identical files, not
            reinstalled); a torch requirement among ``dependencies`` must admit its version.
            Its worker is forked from the manager's fork server, which imported torch once
            (``ExtensionManagerConfig.fork_server``), where it can be.
        allow_direct_references: Accept URLs and local paths among ``dependencies``.
        index_url: The package index that replaces the default one (PyPI), e.g.
            ``"https://download.pytorch.org/whl/cu128"`` (http, https or file URL).
        extra_index_urls: More indexes uv reads; uv takes each package from the first index
            that has it, these before ``index_url``.
        find_links: Folders of wheels (paths, made absolute; each must exist) or URLs of pages
            that list wheels, searched besides the indexes.
        cuda_wheels: Dependencies installed from a CUDA wheel index, each the wheel built for
            the host's torch and CUDA, without its own dependencies: ``index_url`` (or
            ``index_urls``), ``packages`` (names among ``dependencies``) and optionally
            ``package_map`` (dependency name -> its name on the index). Kept as a dict with
            ``index_urls``, ``packages`` and ``package_map``, names canonical. See
            docs/guides/package-sources.md.
        share_torch_no_deps: Dependencies installed without their own dependencies, in a pass
            of their own, so that none pulls a second torch; needs ``share_torch``.
        pass_env: Names of host environment variables the worker may see. By default it sees
            only locale, home, temp-dir and accelerator (CUDA_, OMP_, ...) variables.
        env: Variables set for the worker.
        restart: Restart the worker when it crashes (None: never); see RestartPolicy.
        sandbox_mode: This extension's sandbox mode, a string or ``SandboxMode`` (None: the
            manager's); it may be stricter than the manager's, never looser.
        sandbox: What this extension's worker may reach (None: the manager's policy); it may
            only narrow the manager's ``sandbox``.
        limits: Resources this extension's worker may use (None: the manager's); none may
            exceed the manager's ``limits``.
        host_paths: Folders of the host application this extension may import from, added to
            the manager's ``host_paths`` (see there). The host's decision: a manifest cannot set it.
        share_cuda_ipc: Whether CUDA tensors travel to and from this extension (as CUDA IPC
            handles; their data stays on the device). None: the same as ``share_torch``. True
            needs ``share_torch=True``. Off, a CUDA tensor sent to it fails with ``EncodeError``
            where it is sent (move it to the CPU first), and one it receives anyway is refused.
        execution_model: A constraint, as pyisolate 0.10 spelled it: ``"sealed_worker"`` (it
            shares nothing from the host but its ``host_paths``: ``share_torch`` and
            ``share_cuda_ipc`` are refused), ``"host-coupled"`` (anything goes), or None.
        sealed_host_ro_paths: pyisolate 0.10's name for ``host_paths`` of a sealed worker: only
            with ``execution_model="sealed_worker"``; added to ``host_paths``.
        package_manager: ``"uv"``, the only one (conda environments are not supported).
        watch: Reload the extension (``Extension.reload()``) when a file in its module
            directory changes, debounced; a reload that fails is logged and the old worker
            serves on. None: the manager's ``watch``. Needs the ``watch`` extra
            (``pip install 'pyisolate[watch]'``) and ``isolated=True``. See docs/guides/reload.md.
        remote: The worker runs on another machine: the host spawns nothing and waits, up to
            ``start_timeout``, for ``pyisolate worker --connect ...`` to join under this name
            through the manager's ``listen`` endpoint with the key ``curve`` binds to it.
            ``module_path`` is then the extension's directory on that machine (informational:
            the worker names its own), and the venv is built there. A lost worker (partition,
            exit) is a crash: ``restart`` then waits for it to rejoin. See docs/guides/remote.md.
        placement: Start the worker on a node of a Ray cluster (``RayPlacement``) rather than
            waiting for someone to: the host launches ``pyisolate worker`` there with a key made
            for that launch (no allowlist entry needed), and ``module_path`` must exist at the
            same path on the node. Implies ``remote=True``. A lost node or Ray actor is a crash;
            a restart launches again. See docs/guides/ray.md.
    """

    name: str
    module_path: str | os.PathLike[str]
    isolated: bool = True
    dependencies: Sequence[str] = ()
    apis: Sequence[type[Any]] = field(default=())
    share_torch: bool = False
    allow_direct_references: bool = False
    index_url: str | None = None
    extra_index_urls: Sequence[str] = ()
    find_links: Sequence[str | os.PathLike[str]] = ()
    cuda_wheels: Mapping[str, Any] | None = None
    share_torch_no_deps: Sequence[str] = ()
    pass_env: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    restart: RestartPolicy | None = None
    sandbox_mode: str | SandboxMode | None = None
    sandbox: SandboxPolicy | Mapping[str, Any] | None = None
    limits: Limits | Mapping[str, Any] | None = None
    host_paths: Sequence[str | os.PathLike[str]] = ()
    share_cuda_ipc: bool | None = None
    execution_model: str | None = None
    sealed_host_ro_paths: Sequence[str | os.PathLike[str]] = ()
    package_manager: str = "uv"
    watch: bool | None = None
    remote: bool = False
    placement: RayPlacement | None = None

    def __post_init__(self) -> None:
        validate_extension_name(self.name)
        if self.placement is not None:
            if not isinstance(self.placement, RayPlacement):
                raise ConfigError(f"ExtensionConfig.placement (extension {self.name!r}) must be a "
                                  f"pyisolate.RayPlacement, got {self.placement!r}")
            object.__setattr__(self, "remote", True)  # placed elsewhere: it joins over the listener
        if not isinstance(self.remote, bool):
            raise ConfigError(f"ExtensionConfig.remote (extension {self.name!r}) must be True or False")
        if self.remote and not self.isolated:
            raise ConfigError(f"ExtensionConfig.remote (extension {self.name!r}) needs isolated=True: a remote "
                              "extension runs in a worker on another machine")
        where = f"(extension {self.name!r})"
        if self.remote and self.watch:
            raise ConfigError(f"ExtensionConfig.watch {where}: a remote worker's source is on its own machine, where "
                              "the host cannot watch it; set watch=False (or leave it None)")
        if self.watch is not None and not isinstance(self.watch, bool):
            raise ConfigError(f"ExtensionConfig.watch {where} must be True, False or None, got {self.watch!r}")
        if self.sandbox_mode is not None:
            mode = check_mode(self.sandbox_mode, f"ExtensionConfig.sandbox_mode {where}")
            object.__setattr__(self, "sandbox_mode", mode)
        object.__setattr__(self, "sandbox", SandboxPolicy.parse(self.sandbox, f"ExtensionConfig.sandbox {where}"))
        object.__setattr__(self, "limits", Limits.parse(self.limits, where=f"ExtensionConfig.limits {where}"))
        object.__setattr__(self, "host_paths", _host_paths(self.host_paths, "ExtensionConfig.host_paths", f" {where}"))
        path = Path(self.module_path).expanduser().absolute()
        if self.remote:  # a path on the worker's machine: `pyisolate worker` checks it there
            pass
        elif not (path.is_dir() and (path / "__init__.py").is_file()) and not (
            path.suffix == ".py" and path.is_file()
        ):
            raise ConfigError(
                f"ExtensionConfig.module_path {str(path)!r} (extension {self.name!r}) is not a package "
                "directory with an __init__.py, nor a .py file; point it at the extension's code"
            )
        object.__setattr__(self, "module_path", path)
        if isinstance(self.dependencies, str):
            raise ConfigError(
                f"ExtensionConfig.dependencies must be a list of requirement strings, got the string "
                f"{self.dependencies!r}; write [{self.dependencies!r}]"
            )
        deps = self.dependencies
        if isinstance(deps, (str, bytes)):
            validate_dependencies(deps)  # raises: says to write a list
        checked: list[str] = []
        for index, dep in enumerate(deps):
            try:
                checked += validate_dependencies([dep], allow_direct_references=self.allow_direct_references)
            except ConfigError as exc:
                raise ConfigError(f"ExtensionConfig.dependencies[{index}] (extension {self.name!r}): {exc}") from None
        object.__setattr__(self, "dependencies", tuple(checked))

        if isinstance(self.apis, (str, type)):
            raise ConfigError(f"ExtensionConfig.apis must be a list of ProxiedSingleton classes, got {self.apis!r}")
        for api in self.apis:
            if not (isinstance(api, type) and issubclass(api, ProxiedSingleton)) or api is ProxiedSingleton:
                raise ConfigError(
                    f"ExtensionConfig.apis (extension {self.name!r}): {api!r} is not a ProxiedSingleton "
                    "subclass; list the classes of the host's shared services"
                )
            module = sys.modules.get(api.__module__)
            if getattr(module, "__file__", None) is None:
                raise ConfigError(
                    f"ExtensionConfig.apis: {api.__qualname__} must be defined in a module file, so that "
                    "extensions can import it"
                )
        object.__setattr__(self, "apis", tuple(self.apis))
        if self.share_torch:
            _check_shared_torch(self.name, self.dependencies)
        self._check_sources()
        if isinstance(self.pass_env, str) or not all(isinstance(n, str) and n and "=" not in n for n in self.pass_env):
            raise ConfigError(f"ExtensionConfig.pass_env must be a list of variable names, got {self.pass_env!r}")
        object.__setattr__(self, "pass_env", tuple(self.pass_env))
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in self.env.items()
        ):
            raise ConfigError(f"ExtensionConfig.env must map variable names to strings, got {self.env!r}")
        object.__setattr__(self, "env", dict(self.env))
        if self.restart is not None and not isinstance(self.restart, RestartPolicy):
            raise ConfigError(f"ExtensionConfig.restart must be a RestartPolicy or None, got {self.restart!r}")
        for flag in ("isolated", "share_torch", "allow_direct_references"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"ExtensionConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        check_upstream_keys(self.name, share_torch=self.share_torch, share_cuda_ipc=self.share_cuda_ipc,
                            execution_model=self.execution_model, sealed_host_ro_paths=self.sealed_host_ro_paths,
                            package_manager=self.package_manager)  # fmt: skip
        sealed = _host_paths(self.sealed_host_ro_paths, "ExtensionConfig.sealed_host_ro_paths", f" {where}")
        object.__setattr__(self, "sealed_host_ro_paths", sealed)
        object.__setattr__(self, "host_paths", tuple(dict.fromkeys([*self.host_paths, *sealed])))

    def _check_sources(self) -> None:
        """Check where the packages come from, and keep each setting in its plain form."""
        owner = f" (extension {self.name!r})"
        if self.index_url is not None:
            object.__setattr__(self, "index_url", check_url(self.index_url, Where("ExtensionConfig.index_url", owner)))
        extra = Where("ExtensionConfig.extra_index_urls", owner)
        if isinstance(self.extra_index_urls, str) or not isinstance(self.extra_index_urls, Sequence):
            raise ConfigError(f"{extra} must be a list of URLs, got {self.extra_index_urls!r}; write "
                              f"[{self.extra_index_urls!r}]")
        urls = tuple(check_url(url, extra[i]) for i, url in enumerate(self.extra_index_urls))
        object.__setattr__(self, "extra_index_urls", urls)
        links = check_find_links(self.find_links, Where("ExtensionConfig.find_links", owner))
        object.__setattr__(self, "find_links", links)
        if self.cuda_wheels is not None:
            where = Where("ExtensionConfig.cuda_wheels", owner)
            cuda = CudaWheels.parse(self.cuda_wheels, where)
            check_listed(cuda.packages, self.dependencies, where.key("packages"))
            object.__setattr__(self, "cuda_wheels", cuda.as_dict())
        where = Where("ExtensionConfig.share_torch_no_deps", owner)
        no_deps = check_names(self.share_torch_no_deps, where)
        if no_deps and not self.share_torch:
            raise ConfigError(f"{where} is only for share_torch=True (it keeps those packages from pulling a "
                              "torch of their own); set share_torch=True, or remove share_torch_no_deps")
        check_listed(no_deps, self.dependencies, where)
        object.__setattr__(self, "share_torch_no_deps", no_deps)

    @property
    def sources(self) -> PackageSources:
        """Where this extension's packages come from, as one value (what the venv builder takes)."""
        cuda = None if self.cuda_wheels is None else CudaWheels.parse(self.cuda_wheels, "ExtensionConfig.cuda_wheels")
        return PackageSources(
            index_url=self.index_url, extra_index_urls=tuple(self.extra_index_urls),
            find_links=tuple(map(str, self.find_links)), cuda_wheels=cuda, no_deps=tuple(self.share_torch_no_deps),
        )  # fmt: skip

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **overrides: Any) -> ExtensionConfig:
        """Build the config of the extension at ``path`` from its ``pyproject.toml``, if any.

        ``[project].dependencies`` and the ``[tool.pyisolate]`` table feed the config (see
        docs/guides/manifests.md); keyword arguments override them. The name is, in order:
        ``name=``, ``[tool.pyisolate].name``, ``[project].name``, the directory's name (the
        last two made valid: other characters become ``-``).

        Args:
            path: The extension's package directory, or a single ``.py`` file (no manifest).
            **overrides: Any ExtensionConfig field but ``module_path``.

        Returns:
            The validated config, with ``module_path`` set to ``path``.

        Raises:
            ConfigError: ``path`` is not an extension, or its manifest or the result is invalid;
                the message names the file, the field and the fix.
            TypeError: an override is not an ExtensionConfig field.
        """
        from dataclasses import fields

        known = {f.name for f in fields(cls)} - {"module_path"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"ExtensionConfig.from_path() got unknown field(s) {', '.join(unknown)}; "
                f"it takes the path, then any of {', '.join(sorted(known))}"
            )
        where = Path(path).expanduser().absolute()
        if where.is_dir():
            manifest = read_manifest(where)
        elif where.is_file() and where.suffix == ".py":
            manifest = Manifest(None)
        else:
            raise ConfigError(
                f"ExtensionConfig.from_path(): {str(where)!r} is not an extension directory nor a .py file; "
                "point it at the extension's package directory"
            )
        read = dict(manifest.values)
        if "restart" in read:
            read["restart"] = _restart_policy(read["restart"], manifest.path)
        values = {**read, **overrides, "module_path": where}
        if "name" not in values:
            source = manifest.project_name or (where.stem if where.is_file() else where.name)
            values["name"] = default_name(source)
            try:
                validate_extension_name(values["name"])
            except ConfigError:
                raise ConfigError(
                    f"cannot make an extension name from {source!r} ({where}); set name in the "
                    "[tool.pyisolate] table of its pyproject.toml, or pass name=..."
                ) from None
        try:
            return cls(**values)
        except ConfigError as exc:
            if manifest.path is None or str(manifest.path) in str(exc):
                raise
            raise ConfigError(f"{exc} (settings read from {manifest.path})") from None


def _check_shared_torch(extension: str, dependencies: Sequence[str]) -> None:
    """share_torch needs torch in the host, of a version every torch requirement admits."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"ExtensionConfig.share_torch (extension {extension!r}): torch is not installed in the host; "
            "install it there (pip install torch==<version>) or set share_torch=False"
        ) from None
    for text in dependencies:
        try:
            requirement = Requirement(text)
        except ValueError:
            continue  # a direct reference: validated elsewhere
        if canonicalize_name(requirement.name) == "torch" and not requirement.specifier.contains(
            version, prereleases=True
        ):
            raise ConfigError(
                f"ExtensionConfig.dependencies (extension {extension!r}): {text!r} does not admit the "
                f"host's torch {version}, which share_torch=True shares; relax the requirement"
            )


def _restart_policy(value: bool | dict[str, Any], manifest: Path | None) -> RestartPolicy | None:
    """The policy a manifest's ``restart`` (``true``, ``false`` or a table) asks for."""
    if not isinstance(value, dict):
        return RestartPolicy() if value else None
    try:
        return RestartPolicy(**value)
    except ConfigError as exc:
        raise ConfigError(f"{manifest}: [tool.pyisolate.restart]: {exc}; fix that value") from None


def _check_listen(config: ExtensionManagerConfig) -> None:
    """``listen`` is a tcp endpoint and comes with ``curve``: remote workers are authenticated."""
    curve = CurveConfig.parse(config.curve)
    object.__setattr__(config, "curve", curve)
    if config.listen is None:
        return
    if not isinstance(config.listen, str) or not config.listen.startswith("tcp://") or ":" not in config.listen[6:]:
        raise ConfigError(f"ExtensionManagerConfig.listen must be a tcp endpoint such as 'tcp://0.0.0.0:5555', "
                          f"got {config.listen!r}")
    if curve is None:
        raise ConfigError("ExtensionManagerConfig.listen needs curve=CurveConfig(...): a tcp listener without CURVE "
                          "would let anyone who reaches the port join as an extension and call the host. Make keys "
                          "with `pyisolate keys host` and `pyisolate keys EXTENSION` (see docs/guides/remote.md)")
