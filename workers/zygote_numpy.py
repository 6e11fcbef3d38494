"""What ``import torch`` remembers about numpy, which a child of the fork server must forget.

The fork server imports torch without numpy (each extension brings its own, 1.x or 2.x). But
torch checks for numpy while it imports: in C++, ``torch::utils::is_numpy_available()`` keeps its
answer in a function-local static (set by the first parse of a ``torch.device``), and a few of
its Python modules set ``HAS_NUMPY = False`` / ``np = None``. A child that kept these would have
no ``torch.from_numpy`` and no ``tensor.numpy()`` while its venv holds numpy.

So the fork server finds, in ``libtorch_python.so``'s symbol table, that static and its C++ guard
(``NumpyCheck.find``); each child zeroes both (``reset``: the next call runs the check again,
with the child's numpy, and sets numpy's C API table for the first time: the fork server never
had one) and, where its venv has numpy, gives it to those modules when it is first imported
(by the extension, or by torch's check), as a spawned worker's ``import torch`` would have.
A torch build without the symbols cannot be forked from: ``find`` raises, and the fork server
does not start (share_torch workers are then spawned).
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import importlib.util
import mmap
import os
import struct
import sys
from typing import Any

__all__ = ["NumpyCheck"]

_FUNCTION = "_ZN5torch5utils18is_numpy_availableEv"
_GUARD = "_ZGVZN5torch5utils18is_numpy_availableEvE9available"  # the Itanium ABI's guard of the static
_VALUE = "_ZZN5torch5utils18is_numpy_availableEvE9available"
_SHT_SYMTAB = 2
_GUARD_SIZE = 8


class NumpyCheck:
    """The addresses of torch's cached numpy check in this process (and so in its children)."""

    def __init__(self, guard: int, value: int) -> None:
        self.guard = guard
        self.value = value

    @classmethod
    def find(cls, torch: Any) -> NumpyCheck:
        """Locate the check in the loaded ``libtorch_python.so``; RuntimeError if it cannot be."""
        library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_python.so")
        offsets = _symbols(library, (_FUNCTION, _GUARD, _VALUE))
        if len(offsets) != 3:
            raise RuntimeError(f"{library} has no symbol table naming torch's numpy check; this torch build cannot "
                               "be shared by a fork server")
        loaded = ctypes.cast(getattr(ctypes.CDLL(library), _FUNCTION), ctypes.c_void_p).value
        assert loaded is not None
        base = loaded - offsets[_FUNCTION]
        check = cls(base + offsets[_GUARD], base + offsets[_VALUE])
        # What the import left: the guard's first byte set (done), the answer "no numpy".
        guard, value = ctypes.string_at(check.guard, 1), ctypes.string_at(check.value, 1)
        if guard not in (b"\0", b"\1") or value != b"\0":
            raise RuntimeError(f"torch's numpy check in {library} is not in the state expected (guard {guard!r}, "
                               f"value {value!r}); this torch build cannot be shared by a fork server")
        return check

    def reset(self) -> None:
        """In a child (one thread): forget the answer; hand numpy to torch's modules once it is imported."""
        ctypes.memset(self.guard, 0, _GUARD_SIZE)
        ctypes.memset(self.value, 0, 1)
        if "numpy" in sys.modules:
            _give_numpy(sys.modules["numpy"])
        elif importlib.util.find_spec("numpy") is not None:
            # Not imported now: a spawned worker's torch import would have paid for it, but an
            # extension that never uses numpy need not (~0.1 s of CPU and ~8 MB per worker).
            sys.meta_path.insert(0, _NumpyWatch())


class _NumpyWatch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of numpy, lets the other finders find it, and
    gives the module to torch's modules once it has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "numpy":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _GivingLoader(spec.loader)
        return spec


class _GivingLoader(importlib.abc.Loader):
    """numpy's own loader, which then gives numpy to torch's modules."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # what numpy sees of itself is its own
        self._loader.exec_module(module)
        _give_numpy(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _give_numpy(numpy: Any) -> None:
    """Set what torch's modules set at import where numpy imports (``HAS_NUMPY``, ``np``)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch") or module is None:
            continue
        names = vars(module)
        if names.get("HAS_NUMPY") is False:
            names.update(HAS_NUMPY=True, np=numpy, numpy=numpy)
        elif "np" in names and names["np"] is None:
            names["np"] = numpy


def _symbols(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """The values (offsets) of ``names`` in the ELF64 little-endian ``path``'s ``.symtab``."""
    found: dict[str, int] = {}
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            return found
        (table,) = struct.unpack_from("<Q", elf, 0x28)
        entry, count = struct.unpack_from("<HH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, table + i * entry) for i in range(count)]
        for _, kind, _, _, offset, size, link, _, _, symbol_size in sections:
            if kind != _SHT_SYMTAB or not 0 <= link < count or symbol_size < 16:
                continue
            strings, strings_size = sections[link][4], sections[link][5]
            for name in names:
                at = elf.find(b"\0" + name.encode() + b"\0", strings, strings + strings_size)
                if at < 0:
                    continue
                wanted = struct.pack("<I", at + 1 - strings)  # st_name: the name's index in the string table
                hit = elf.find(wanted, offset, offset + size)
                while hit >= 0:
                    if (hit - offset) % symbol_size == 0:
                        (found[name],) = struct.unpack_from("<Q", elf, hit + 8)  # st_value
                        break
                    hit = elf.find(wanted, hit + 1, offset + size)
    return found
