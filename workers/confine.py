"""Confine the worker process: what it may read, write, reach on the network, and signal.

The worker bootstrap calls ``apply`` once the host's boot message has arrived and before any
extension code is imported, while the process still has one thread. Two kernel mechanisms
do the work, both usable without privileges once ``no_new_privs`` is set:

- **Landlock** (Linux 5.13+) limits the file system to the ``read`` and ``write`` grants,
  TCP to the ``tcp_connect`` ports (ABI 4), and, with ``scope``, signals and abstract unix
  sockets to this process and its descendants (ABI 6). A Landlock domain also keeps the
  process from tracing any process outside it, and from reading what its ``/proc/<pid>/``
  ``environ``, ``maps``, ``mem``, ``cwd`` and ``fd/*`` links hold, whatever the grants say.
- **seccomp** refuses every socket family but ``AF_UNIX`` and ``AF_NETLINK`` (and TCP over
  IPv4 when ``tcp_connect`` names ports), and io_uring, whose socket operation would get past
  that check. It stands in for what Landlock does not cover: UDP (so DNS), raw and packet
  sockets, IPv6, and families that tunnel over IP (SMC, RDS, TIPC, vsock to the hypervisor).

Both are inherited by every process the worker starts and cannot be lifted. Each works per
thread: a thread that was already running when ``apply`` ran would stay unconfined, so
``apply`` reports one as a missing part (and ``required`` refuses).

``apply`` also drops every capability but the four that only widen owner and mode checks on
files (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID), where Landlock still decides. A
worker running as root would keep the rest, and some of them reach past Landlock: with
CAP_SYS_ADMIN or CAP_PERFMON, recent kernels (6.18 among them) let ``/proc/<pid>/environ``,
``maps`` and ``smaps`` of any process be read without the ptrace check that Landlock hooks
(``mm_access``); with CAP_NET_ADMIN, netlink reconfigures the machine's network;
CAP_SYS_MODULE loads kernel code.

Landlock ABI by kernel, and what this module uses of each: 1 (5.13) files; 2 (5.19) links and
renames across directories (without it they always fail); 3 (6.2) truncate; 4 (6.7) TCP bind
and connect; 5 (6.10) ioctl on device files; 6 (6.12) signal and abstract-socket scoping;
7 (6.15) audit logging (not used).

What a worker needs granted (the caller builds the lists; this module adds nothing):

- ``read``: the interpreter's prefix (``sys.base_prefix``) and the venv (``sys.prefix``); the
  pyisolate runtime directory and, with share_torch, the host's torch; shared libraries
  (``/usr``, ``/lib``, ``/lib64``, or wherever the interpreter's libraries live); ``/etc``
  files the C library reads (``ld.so.cache``, ``localtime``, ``hosts``, ``nsswitch.conf``);
  ``/dev/urandom``, ``/dev/random``, ``/dev/zero``; ``/proc`` (``workers.tree`` walks it;
  other processes' entries stay mostly closed, see above and below);
  ``/sys/devices/system/cpu`` (CPU counts).
- ``write``: ``/dev/null`` (``subprocess.DEVNULL`` opens it read-write) and ``/dev/full``; a
  private temporary directory; ``/dev/shm`` if the extension uses POSIX shared memory (the
  runtime's own segments are memfds, which need no grant); device files that need ioctls,
  such as GPUs (``/dev/nvidiactl``, ``/dev/nvidia0``, ``/dev/nvidia-uvm``, ``/dev/dri``):
  ioctls on a device granted only in ``read`` fail with ``EACCES`` from ABI 5 on.
- Nothing for the broker's ``ipc://`` endpoint: Landlock (up to ABI 7) does not govern
  connecting to a pathname unix socket, and seccomp lets ``AF_UNIX`` through. A
  ``tcp://127.0.0.1:PORT`` broker needs PORT in ``tcp_connect``.
- Descriptors the process already holds (stdio, the control channel, a segment received
  later over it) are not checked again: Landlock checks when a file is opened.

What stays open, for another layer (a mount namespace, another user) to close:

- Every pathname unix socket the user can reach: up to ABI 7 Landlock does not check
  ``connect()``. A desktop session bus (``/run/user/<uid>/bus``, through which systemd starts
  programs outside the sandbox), an X server, ssh-agent, ``docker.sock``.
- System V IPC and POSIX message queues of the same user.
- With ``tcp_connect``, its ports on every address, not only 127.0.0.1.
- What ``/proc`` shows every process of the same user: the names of other processes'
  entries, their ``cmdline``, ``status``, and the descriptor numbers in ``fd`` (Landlock rules
  are by path; the ``hidepid=2`` mount option of ``/proc`` hides other users' processes).

Only the standard library and ctypes: this runs before the runtime's own imports matter, on
any CPython 3.10+ on Linux x86_64 or aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from collections.abc import Mapping, Sequence

__all__ = ["ConfineError", "apply", "probe"]


class ConfineError(Exception):
    """A part of the confinement that was required could not be enforced.

    The message names each part, why it could not be enforced, and what would fix it.
    """


#: Caps the Landlock ABI that ``apply`` uses (None: what the kernel offers). Tests lower it to
#: reach the paths of older kernels; the syscalls still run, asking only for the older rights.
_ABI_LIMIT: int | None = None

# --- Landlock (include/uapi/linux/landlock.h) -----------------------------------------------
# The syscall numbers come from the generic table: the same on x86_64 and aarch64.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_RULE_NET_PORT = 2

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_BLOCK = 1 << 11
#: ABI 1: EXECUTE through MAKE_SYM (bits 0-12).
_FS_ABI1 = (1 << 13) - 1
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
#: The rights that apply to a file that is not a directory; a rule for one with any other
#: right fails with EINVAL.
_FS_FILE = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
#: Everything, but making device nodes: with CAP_MKNOD, a node made in a writable directory
#: would open any disk or device, past every other rule.
_FS_WRITE = ~(_FS_MAKE_CHAR | _FS_MAKE_BLOCK)

_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

#: Where each Landlock ABI first shipped, for messages.
_ABI_LINUX = {1: "5.13", 2: "5.19", 3: "6.2", 4: "6.7", 5: "6.10", 6: "6.12", 7: "6.15"}


class _RulesetAttr(ctypes.Structure):
    # Kernels that know fewer fields accept the longer struct when the fields they do not
    # know are zero, and they are zero whenever the ABI lacks them.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header: 12 bytes, not 16
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


# --- capabilities (include/uapi/linux/capability.h) ----------------------------------------
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID: a worker run as root in a container may
#: need them to write where its user does not own the files; Landlock still bounds where.
_CAPS_KEPT = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# --- seccomp (include/uapi/linux/seccomp.h, filter.h, bpf_common.h) ------------------------
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_SECCOMP = 21
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_STRICT = 1
_SECCOMP_MODE_FILTER = 2
_SECCOMP_GET_ACTION_AVAIL = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000

_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = 32-bit word at offset k of seccomp_data
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: A == k ? jt : jf
_BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K: A >= k (unsigned) ? jt : jf
_BPF_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: A &= k
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return k

# Offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}: the low 32 bits of
# an argument, on a little-endian machine. socket() takes ints, so the high bits never count.
_DATA_NR = 0
_DATA_ARCH = 4
_DATA_ARG0 = 16
_DATA_ARG1 = 24
_DATA_ARG2 = 32

_AF_UNIX = 1
_AF_INET = 2
_AF_NETLINK = 16
_SOCK_STREAM = 1
_SOCK_TYPE_MASK = 0xF  # SOCK_NONBLOCK and SOCK_CLOEXEC ride in the higher bits of type
_IPPROTO_TCP = 6
_X32_SYSCALL_BIT = 0x40000000


class _Arch:
    """One syscall table: what the filter checks. (Plain classes here: a NamedTuple costs start-up time.)"""

    __slots__ = ("audit_arch", "socket", "socketpair", "seccomp", "io_uring_setup", "has_x32")

    def __init__(self, audit_arch: int, socket: int, socketpair: int, seccomp: int, has_x32: bool) -> None:
        self.audit_arch = audit_arch
        self.socket = socket
        self.socketpair = socketpair
        self.seccomp = seccomp
        self.io_uring_setup = 425  # a newer syscall: the same number in every table
        self.has_x32 = has_x32


_ARCHES = {
    "x86_64": _Arch(audit_arch=0xC000003E, socket=41, socketpair=53, seccomp=317, has_x32=True),
    "aarch64": _Arch(audit_arch=0xC00000B7, socket=198, socketpair=199, seccomp=277, has_x32=False),
}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# --- probing --------------------------------------------------------------------------------


class _Offer:
    """What this kernel and process offer: probe()'s answer."""

    __slots__ = ("landlock_abi", "landlock_reason", "seccomp", "seccomp_reason")

    def __init__(self) -> None:
        self.landlock_abi, self.landlock_reason = _landlock_abi()
        self.seccomp, self.seccomp_reason = _seccomp_offered()


def probe() -> dict[str, object]:
    """Report what confinement this kernel and process offer, without changing anything.

    Returns:
        ``{"landlock_abi": int, "landlock_reason": str, "seccomp": bool, "seccomp_reason": str}``:
        the Landlock ABI version (0: none) and, when it is 0, why; whether a seccomp filter can
        be installed and, when not, why.
    """
    offer = _Offer()
    found: dict[str, object] = {name: getattr(offer, name) for name in _Offer.__slots__}
    if _ABI_LIMIT is not None:  # a test reading this kernel as an older one
        found["landlock_abi"] = min(offer.landlock_abi, _ABI_LIMIT)
    return found


def _landlock_abi() -> tuple[int, str]:
    if not sys.platform.startswith("linux"):
        return 0, f"Landlock is a Linux feature; this is {sys.platform}"
    try:
        return _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)), ""
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return 0, ("Landlock is built into the kernel but was not enabled at boot; add 'landlock' to the "
                       f"lsm= kernel parameter ({_active_lsms()})")
        if exc.errno == errno.ENOSYS:
            return 0, ("the kernel has no Landlock: older than Linux 5.13 or built without "
                       "CONFIG_SECURITY_LANDLOCK (or a seccomp policy hides the syscall)")
        if exc.errno == errno.EPERM:
            return 0, ("a seccomp policy refuses the Landlock syscalls (a container runtime's profile?); "
                       "allow landlock_create_ruleset, landlock_add_rule and landlock_restrict_self")
        return 0, f"landlock_create_ruleset failed: {exc.strerror}"


def _active_lsms() -> str:
    try:
        with open("/sys/kernel/security/lsm") as f:
            return f"active now: {f.read().strip()}"
    except OSError:
        return "the active list is in /sys/kernel/security/lsm"


def _arch() -> _Arch | None:
    """The syscall table of this process, or None where the filter is not written for it."""
    # A 32-bit interpreter on a 64-bit kernel makes i386 (or x32) syscalls: the filter's
    # numbers and offsets would be wrong for it.
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8 or sys.byteorder != "little":
        return None
    return _ARCHES.get(os.uname().machine)


def _seccomp_offered() -> tuple[bool, str]:
    arch = _arch()
    if arch is None:
        bits = ctypes.sizeof(ctypes.c_void_p) * 8
        return False, (f"the seccomp filter is written for 64-bit x86_64 and aarch64 processes; this one is "
                       f"{bits}-bit {os.uname().machine} ({sys.platform}, {sys.byteorder}-endian)")
    try:
        mode = _prctl(_PR_GET_SECCOMP)
    except OSError:  # EINVAL: no CONFIG_SECCOMP
        return False, "the kernel was built without seccomp (CONFIG_SECCOMP)"
    if mode == _SECCOMP_MODE_STRICT:
        return False, "the process is in strict seccomp mode, which allows no filter"
    try:  # asks whether the filter's ERRNO action is available; installs nothing
        _syscall(arch.seccomp, ctypes.c_uint(_SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0),
                 ctypes.byref(ctypes.c_uint32(_SECCOMP_RET_ERRNO)))
    except OSError as exc:
        return False, f"seccomp filters are unavailable ({exc.strerror}): needs CONFIG_SECCOMP_FILTER, Linux 4.14+"
    return True, ""


# --- applying -------------------------------------------------------------------------------


def apply(rules: Mapping[str, object]) -> dict[str, list[str]]:
    """Confine this process, and every process it starts later, for the rest of its life.

    Call it from the only thread of the process (threads already running are not confined).
    Calling it again adds a further layer: the result allows only what both allow.

    Args:
        rules: what stays allowed. Absent keys take their strictest value.

            - ``read``: absolute paths (files or directories, recursively) left readable and
              executable; paths that do not exist or cannot be opened are skipped.
            - ``write``: absolute paths left readable, writable and executable, with files and
              directories created, renamed and removed inside.
            - ``network`` (False): True leaves the network alone. False: no socket of any family
              but ``AF_UNIX`` and ``AF_NETLINK`` (``EACCES``), so TCP, UDP, raw, packet and DNS
              all fail; no io_uring (``ENOSYS``); and no TCP bind or connect (Landlock, ABI 4).
            - ``tcp_connect`` (``[]``): ports that TCP may still connect to on any address while
              ``network`` is False (a ``tcp://127.0.0.1:PORT`` broker). IPv4 stream sockets then
              stay creatable, and Landlock keeps their connects to these ports.
            - ``scope`` (True): signals and abstract unix sockets reach only this process and its
              descendants (Landlock ABI 6).
            - ``required`` (True): refuse, with ``ConfineError``, if any part asked for cannot be
              enforced. False: enforce what can be, and report the rest.

    Returns:
        ``{"enforced": [...], "missing": [...], "skipped": [...]}``: the parts in force
        (``caps``, ``landlock-fs``, ``landlock-truncate``, ``landlock-ioctl-dev``, ``landlock-tcp``,
        ``seccomp-net``, ``scope-signal``, ``scope-abstract-unix``); ``"<part>: <why>"`` for each
        part asked for that is not; ``"<path>: <why>"`` for each path granted nothing.

    Raises:
        ConfineError: ``required`` is set and a part cannot be enforced. Nothing was changed if
            the kernel or process lacks it; if enforcing it failed, some parts may be in force
            already, and the process should exit.
        ValueError, TypeError: ``rules`` is malformed (an unknown key, a relative path, a port
            out of range).
    """
    wanted = _Rules(rules)
    offer = _Offer()
    abi = offer.landlock_abi if _ABI_LIMIT is None else min(offer.landlock_abi, _ABI_LIMIT)
    landlock_parts = _landlock_parts(abi, wanted)
    missing = _missing(abi, offer, wanted)
    if wanted.required and missing:
        raise ConfineError(_refusal(missing))
    arch = _arch() if not wanted.network and offer.seccomp else None
    enforced: list[str] = []
    skipped: list[str] = []
    try:
        # Without no_new_privs an unprivileged process may install neither, and an execve of a
        # set-uid program could shed both.
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        parts = ["caps", *landlock_parts, *(["seccomp-net"] if arch else [])]
        missing += [f"{part}: prctl(PR_SET_NO_NEW_PRIVS) failed: {exc.strerror}" for part in parts]
        landlock_parts, arch = [], None
    else:
        try:
            _drop_capabilities()
        except OSError as exc:
            missing.append(f"caps: capset failed: {exc.strerror}")
        else:
            enforced.append("caps")
    if landlock_parts:
        try:
            skipped = _restrict(abi, wanted)
        except OSError as exc:
            missing += [f"{part}: {exc.strerror} ({exc.filename or 'landlock'})" for part in landlock_parts]
        else:
            enforced += landlock_parts
    if arch:
        try:
            _install_filter(_filter(arch, wanted.tcp_connect))
        except OSError as exc:
            missing.append(f"seccomp-net: prctl(PR_SET_SECCOMP) failed: {exc.strerror}")
        else:
            enforced.append("seccomp-net")
    if wanted.required and missing:
        raise ConfineError(_refusal(missing))
    return {"enforced": enforced, "missing": missing, "skipped": skipped}


class _Rules:
    """``apply``'s rules, checked, with the defaults filled in."""

    __slots__ = ("read", "write", "network", "tcp_connect", "scope", "required")
    KEYS = frozenset(__slots__)

    def __init__(self, rules: Mapping[str, object]) -> None:
        unknown = sorted(set(rules) - self.KEYS)
        if unknown:
            raise ValueError(f"unknown confinement rules {unknown}; the rules are {sorted(self.KEYS)}")
        self.read = self._paths(rules, "read")
        self.write = self._paths(rules, "write")
        self.network = self._flag(rules, "network", False)
        ports = rules.get("tcp_connect", [])
        if not isinstance(ports, Sequence) or not all(type(p) is int and 0 < p < 65536 for p in ports):
            raise ValueError(f"rules['tcp_connect'] must be a list of TCP ports (1-65535), not {ports!r}")
        self.tcp_connect: list[int] = list(ports)
        self.scope = self._flag(rules, "scope", True)
        self.required = self._flag(rules, "required", True)

    @staticmethod
    def _paths(rules: Mapping[str, object], key: str) -> list[str]:
        value = rules.get(key, [])
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"rules[{key!r}] must be a list of absolute paths, not {type(value).__name__}")
        paths = [os.fspath(p) for p in value]
        relative = [p for p in paths if not isinstance(p, str) or not os.path.isabs(p)]
        if relative:
            raise ValueError(f"rules[{key!r}] must hold absolute paths (as str); got {relative!r}")
        return paths

    @staticmethod
    def _flag(rules: Mapping[str, object], key: str, default: bool) -> bool:
        value = rules.get(key, default)
        if not isinstance(value, bool):
            raise TypeError(f"rules[{key!r}] must be True or False, not {value!r}")
        return value


def _landlock_parts(abi: int, wanted: _Rules) -> list[str]:
    """The Landlock parts that ``abi`` lets ``_restrict`` enforce for ``wanted``."""
    parts = [name for name, needs in (("landlock-fs", 1), ("landlock-truncate", 3), ("landlock-ioctl-dev", 5))
             if abi >= needs]
    if not wanted.network and abi >= 4:
        parts.append("landlock-tcp")
    if wanted.scope and abi >= 6:
        parts += ["scope-signal", "scope-abstract-unix"]
    return parts


def _missing(abi: int, offer: _Offer, wanted: _Rules) -> list[str]:
    """``"<part>: <why>"`` for each part ``wanted`` asks for that this process cannot have."""
    missing = []
    threads = _thread_count()
    if threads > 1:
        missing.append(f"all-threads: {threads - 1} other thread(s) already run and would stay unconfined; "
                       "apply() must run before the process starts any thread")

    def lacks(part: str, needs: int, what: str) -> None:
        if abi >= needs:
            return
        if abi == 0:
            why = offer.landlock_reason or f"Landlock ABI is limited to {abi}"
        else:
            why = f"needs Landlock ABI {needs} (Linux {_ABI_LINUX[needs]}), this kernel offers ABI {abi}"
        missing.append(f"{part}: {what}: {why}")

    lacks("landlock-fs", 1, "files outside the grants stay open")
    lacks("landlock-truncate", 3, "truncate() of files granted read-only stays open")
    lacks("landlock-ioctl-dev", 5, "ioctl() on devices granted read-only stays open")
    if not wanted.network:
        if not offer.seccomp:
            missing.append(f"seccomp-net: UDP, raw and non-TCP sockets stay open: {offer.seccomp_reason}")
        if wanted.tcp_connect:  # with no port, seccomp refuses IP sockets anyway
            lacks("landlock-tcp", 4, "TCP connects to ports besides tcp_connect stay open")
    if wanted.scope:
        lacks("scope-signal", 6, "signals to processes outside the sandbox stay open")
        lacks("scope-abstract-unix", 6, "abstract unix sockets outside the sandbox stay reachable")
    return missing


def _refusal(missing: list[str]) -> str:
    return ("cannot confine this process as required: " + "; ".join(missing)
            + ". Run it where the kernel offers these parts, or pass required=False to enforce what it can")


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))  # counts threads started outside Python too
    except OSError:
        return threading.active_count()


def _restrict(abi: int, wanted: _Rules) -> list[str]:
    """Make this thread a Landlock domain for ``wanted``; return the paths skipped, with why."""
    handled_fs = _FS_ABI1
    handled_fs |= _FS_REFER if abi >= 2 else 0
    handled_fs |= _FS_TRUNCATE if abi >= 3 else 0
    handled_fs |= _FS_IOCTL_DEV if abi >= 5 else 0
    handled_net = _NET_BIND_TCP | _NET_CONNECT_TCP if not wanted.network and abi >= 4 else 0
    scoped = _SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX_SOCKET if wanted.scope and abi >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                       ctypes.c_uint32(0))
    skipped = []
    try:
        for paths, rights in ((wanted.read, _FS_READ), (wanted.write, _FS_WRITE)):
            for path in paths:
                why = _allow_path(ruleset, path, rights & handled_fs)
                if why:
                    skipped.append(f"{path}: {why}")
        for port in wanted.tcp_connect if handled_net else ():
            rule = _NetPortAttr(_NET_CONNECT_TCP, port)
            _syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_NET_PORT),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return skipped


def _allow_path(ruleset: int, path: str, rights: int) -> str:
    """Grant ``rights`` beneath ``path``; return why nothing was granted, or ``""``."""
    try:
        # O_PATH: no read permission needed, no open side effects (a FIFO, a tty).
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FS_FILE
        rule = _PathBeneathAttr(rights, fd)
        try:
            _syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)
    return ""


def _drop_capabilities() -> None:
    """Keep only the file-ownership capabilities, in every set; no_new_privs keeps exec from adding any."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit words of each set
    _check(_c().capget(ctypes.byref(header), data))
    for word, kept in zip(data, (_CAPS_KEPT & 0xFFFFFFFF, _CAPS_KEPT >> 32)):
        word.effective &= kept
        word.permitted &= kept
        word.inheritable &= kept
    _check(_c().capset(ctypes.byref(header), data))
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:  # EINVAL: Linux before 4.3 has no ambient set to clear
        pass


# --- the seccomp filter ---------------------------------------------------------------------

#: One instruction before its jumps are resolved: (code, k, label if true, label if false);
#: None: fall through to the next instruction. A str alone is a label.
_Step = tuple[int, int, str | None, str | None] | str


def _filter(arch: _Arch, tcp_ports: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Assemble the classic BPF program that refuses network sockets; ``(code, jt, jf, k)`` each."""
    program: list[_Step] = [
        # A process can make syscalls of another ABI (int 0x80 on x86_64 is i386, with
        # socketcall(), which would carry socket() past the check below): refuse them all.
        (_BPF_LD_W_ABS, _DATA_ARCH, None, None),
        (_BPF_JEQ_K, arch.audit_arch, "native", None),
        (_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM, None, None),
        "native",
        (_BPF_LD_W_ABS, _DATA_NR, None, None),
    ]
    if arch.has_x32:
        # x32 syscalls carry the native AUDIT_ARCH with bit 30 set in nr: a second table.
        program.append((_BPF_JGE_K, _X32_SYSCALL_BIT, "eperm", None))
    program += [
        # io_uring's IORING_OP_SOCKET makes sockets without the socket() syscall.
        (_BPF_JEQ_K, arch.io_uring_setup, "enosys", None),
        (_BPF_JEQ_K, arch.socket, "family", None),
        (_BPF_JEQ_K, arch.socketpair, "family", "allow"),
        # An allow-list of families: a deny-list would miss the ones that carry IP (SMC, RDS,
        # TIPC) or leave the machine otherwise (vsock to the hypervisor, Bluetooth, CAN).
        "family",
        (_BPF_LD_W_ABS, _DATA_ARG0, None, None),
        (_BPF_JEQ_K, _AF_UNIX, "allow", None),  # the broker's ipc://, asyncio's self-pipe
        (_BPF_JEQ_K, _AF_NETLINK, "allow", "inet" if tcp_ports else "eacces"),  # the C library asks the kernel
    ]
    if tcp_ports:
        # IPv4 TCP only: Landlock then decides which ports it may connect to. UDP, raw and
        # protocols riding stream sockets (MPTCP, which Landlock's TCP rules do not see) stay out.
        program += [
            "inet",
            (_BPF_JEQ_K, _AF_INET, None, "eacces"),
            (_BPF_LD_W_ABS, _DATA_ARG1, None, None),
            (_BPF_AND_K, _SOCK_TYPE_MASK, None, None),
            (_BPF_JEQ_K, _SOCK_STREAM, None, "eacces"),
            (_BPF_LD_W_ABS, _DATA_ARG2, None, None),
            (_BPF_JEQ_K, 0, "allow", None),
            (_BPF_JEQ_K, _IPPROTO_TCP, "allow", "eacces"),
        ]
    program += [
        "allow", (_BPF_RET_K, _SECCOMP_RET_ALLOW, None, None),
        "eacces", (_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EACCES, None, None),
        "eperm", (_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM, None, None),
        "enosys", (_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS, None, None),
    ]
    return _assemble(program)


def _assemble(program: list[_Step]) -> list[tuple[int, int, int, int]]:
    """Resolve labels to the relative forward jumps classic BPF takes."""
    labels: dict[str, int] = {}
    steps: list[tuple[int, int, str | None, str | None]] = []
    for step in program:
        if isinstance(step, str):
            labels[step] = len(steps)
        else:
            steps.append(step)

    def offset(at: int, label: str | None) -> int:
        jump = 0 if label is None else labels[label] - at - 1
        if not 0 <= jump <= 255:
            raise AssertionError(f"BPF jump to {label} out of range ({jump})")
        return jump

    return [(code, offset(i, jt), offset(i, jf), k) for i, (code, k, jt, jf) in enumerate(steps)]


def _install_filter(program: list[tuple[int, int, int, int]]) -> None:
    filters = (_SockFilter * len(program))(*(_SockFilter(code, jt, jf, k) for code, jt, jf, k in program))
    fprog = _SockFprog(len(program), filters)
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# --- syscalls -------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.restype = ctypes.c_int
        _libc.capget.restype = _libc.capset.restype = ctypes.c_int
    return _libc


def _syscall(number: int, *args: object) -> int:
    """Call syscall ``number``; ``args`` are ctypes values (ints widened by the caller). OSError on -1."""
    return _check(_c().syscall(ctypes.c_long(number), *args))


def _prctl(option: int, *args: int) -> int:
    """Call prctl(2) with ``args`` padded to four unsigned longs. OSError on -1."""
    values = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
    return _check(_c().prctl(ctypes.c_int(option), *values))


def _check(result: int) -> int:
    """``result`` of a libc call, or OSError from errno if it is -1."""
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
