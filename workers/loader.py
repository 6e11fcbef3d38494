"""Import an extension and build the object that serves its calls.

Used in the worker process, and by the host itself for ``isolated=False`` extensions.
"""

from __future__ import annotations

import importlib.util
import inspect
import keyword
import os
import re
import sys
import types
from typing import Any, TypeVar

from pyisolate._base import ExtensionBase

__all__ = ["ClassSpec", "class_spec", "import_class", "import_module_path", "load_extension", "load_types",
           "trim_traceback"]

T = TypeVar("T")

#: A path as callers give it. (os.path, not pathlib: pathlib would cost every worker's start-up
#: an import it otherwise never needs.)
StrPath = str | os.PathLike[str]

#: How the host names a class the worker must import: module, qualname and source file.
ClassSpec = dict[str, str]


def class_spec(cls: type) -> ClassSpec | None:
    """Describe ``cls`` so that a worker can import it from its source file.

    Returns None for ``ExtensionBase`` itself, which every worker has.
    """
    if cls is ExtensionBase:
        return None
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if path is None:
        raise TypeError(
            f"{cls.__qualname__} is defined in {cls.__module__!r}, which has no source file; "
            "define the extension class in a module file so that extension processes can import it"
        )
    return {"module": cls.__module__, "qualname": cls.__qualname__, "file": str(path)}


def import_class(spec: ClassSpec, base: type[T] = ExtensionBase) -> type[T]:  # type: ignore[assignment]
    """Import the class described by ``spec`` from its source file, not from site-packages."""
    name = spec["module"]
    module = sys.modules.get(name)
    if module is None:
        if name == "__main__":  # the host's script: import it under another name
            name = "__pyisolate_host_main__"
        module = _exec_file(name, spec["file"])
    obj: Any = module
    for part in spec["qualname"].split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{spec['qualname']} in {spec['file']} is not a {base.__name__} subclass")
    return obj


def load_types(reference: str) -> Any:
    """Fill a new TypeRegistry with the application's function named ``"module:function"``.

    The module is imported by its name, from ``sys.path`` (in a worker: its venv, then the
    pyisolate runtime, then the host's granted paths). The same function runs in the host and
    in every worker, so both sides know the same types.

    Raises:
        ImportError: the module or the function cannot be imported (the message says which).
        TypeError: the name is not a callable.
        Exception: whatever the function raised (a ConfigError from ``register``, say).
    """
    import importlib

    from pyisolate._wire import TypeRegistry

    module_name, _, qualname = reference.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no {qualname!r}") from None
    if not callable(obj):
        raise TypeError(f"{reference} is a {type(obj).__name__}, not a function that takes a TypeRegistry")
    registry = TypeRegistry()
    obj(registry)
    return registry


def import_module_path(module_path: StrPath) -> types.ModuleType:
    """Import the extension at ``module_path``: a package directory or a ``.py`` file."""
    path = os.path.realpath(module_path)
    if os.path.isdir(path):
        init = os.path.join(path, "__init__.py")
        if not os.path.isfile(init):
            raise ImportError(f"extension directory {path} has no __init__.py")
        return _exec_file(_module_name(os.path.basename(path)), init, package_dir=path)
    stem, suffix = os.path.splitext(os.path.basename(path))
    if suffix == ".py" and os.path.isfile(path):
        return _exec_file(_module_name(stem), path)
    raise ImportError(f"extension module path {path} is neither a package directory nor a .py file")


def _module_name(stem: str) -> str:
    name = re.sub(r"\W", "_", stem)
    if not name.isidentifier() or keyword.iskeyword(name) or name in sys.modules:
        return f"pyisolate_extension_{name}"
    try:
        taken = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        taken = True
    return f"pyisolate_extension_{name}" if taken else name


def _exec_file(name: str, file: StrPath, package_dir: str | None = None) -> types.ModuleType:
    locations = [package_dir] if package_dir is not None else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    _ensure_parents(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _ensure_parents(name: str) -> None:
    """Give a dotted module name empty parent packages, so it imports without the parents' code."""
    parts = name.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            stub = types.ModuleType(parent)
            stub.__path__ = []
            sys.modules[parent] = stub


def find_extension_class(module: types.ModuleType, base: type[ExtensionBase]) -> type[ExtensionBase] | None:
    """The subclass of ``base`` that ``module`` itself defines, if any.

    Raises:
        TypeError: the module defines more than one candidate.
    """
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, base)
        and obj is not base
        and obj.__module__ == module.__name__
    ]
    # Prefer the most derived: drop classes that another candidate subclasses.
    leaves = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
    if len(leaves) > 1:
        names = ", ".join(sorted(c.__qualname__ for c in leaves))
        raise TypeError(
            f"extension module {module.__name__} defines several {base.__name__} subclasses "
            f"({names}); keep one per extension"
        )
    return leaves[0] if leaves else None


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def load_extension(module_path: StrPath, base: type[ExtensionBase]) -> ExtensionBase:
    """Import the extension and run its hooks in the documented order (see ExtensionBase)."""
    instance: ExtensionBase = base()
    await _maybe_await(instance.before_module_loaded())
    module = import_module_path(module_path)
    own = find_extension_class(module, base)
    if own is not None:
        instance = own()
        if own.before_module_loaded is not base.before_module_loaded:
            # Its own hook could not run before the import that defined it: run it now.
            await _maybe_await(instance.before_module_loaded())
    await _maybe_await(instance.on_module_loaded(module))
    return instance


def _our_dirs() -> tuple[str, ...]:
    """Where pyisolate's own code lives in this process, as imported (in a worker: the runtime
    directory's links), with a separator so a prefix test matches whole directories only."""
    # Found, not imported: the loader sits below the package that would import it.
    specs = (importlib.util.find_spec(name) for name in ("pyisolate", "pyisolate.broker", "pyisolate.workers"))
    return tuple(os.path.dirname(spec.origin or "") + os.sep for spec in specs if spec is not None)


def trim_traceback(exc: BaseException) -> BaseException:
    """Drop pyisolate's loader frames and importlib's machinery from ``exc``'s traceback (and
    its causes'), keeping the extension's own frames: what a user reads is their code.

    Returns ``exc``, changed in place.
    """
    ours = _our_dirs()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = []
        tb = current.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if not (filename.startswith(ours) or filename.startswith("<frozen importlib")):
                frames.append(tb)
            tb = tb.tb_next
        rebuilt = None
        for frame_tb in reversed(frames):
            rebuilt = types.TracebackType(rebuilt, frame_tb.tb_frame, frame_tb.tb_lasti, frame_tb.tb_lineno)
        current.__traceback__ = rebuilt
        current = current.__cause__ or current.__context__
    return exc
