"""Tensors and arrays born in shared memory: returned or sent, they travel with no copy at all.

``shared_empty`` gives a CPU tensor (``shared_empty_array`` a numpy array) whose memory is a
segment of this process's pool (``shm._pool``), so sending it costs one small message: no
segment to make and no copy into one. Its contents are whatever the memory held, as with
``torch.empty``. Where shared memory is not set up (a host before its first extension loads)
or has no room, it is ordinary memory, and moves to shared memory when sent, as any value does.

Why no allocator context ("every tensor this method makes lands in shared memory"): torch's
CPU allocator is one process-wide C++ object (``c10::SetCPUAllocator``), not switchable for a
scope from Python, and numpy's (``PyDataMem_SetHandler``) takes a C handler; both would put
every temporary of the method, not only its outputs, into shared memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from . import shm as _shm

__all__ = ["shared_empty", "shared_empty_array"]


def _dims(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"a shape is a sequence of sizes of 0 or more, got {shape!r}")
    return dims


def _segment(nbytes: int, what: str) -> _shm.Segment | None:
    """A pooled (else new) segment of ``nbytes`` for a value that no actor has seen yet, or None."""
    if nbytes == 0 or not _shm.session():
        return None
    try:
        return _shm.new_segment(nbytes, None)
    except _shm.NoRoom as exc:
        _shm.warn_copy(exc, what)
        return None


def shared_empty(shape: int | Sequence[int], dtype: Any = None, *, requires_grad: bool = False) -> Any:
    """A new CPU tensor whose storage lives in shared memory (contents uninitialised).

    Args:
        shape: Its size, e.g. ``(1, 1024, 1024, 3)``.
        dtype: A ``torch.dtype`` (default: ``torch.get_default_dtype()``).
        requires_grad: As for ``torch.empty``.

    Returns:
        A contiguous tensor; sent or returned to another actor, it travels with no copy.

    Raises:
        ValueError: the shape is not a sequence of sizes of 0 or more.
    """
    import torch

    dims = _dims(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    numel = math.prod(dims)
    segment = _segment(numel * dtype.itemsize, "tensor")
    if segment is None:
        return torch.empty(dims, dtype=dtype, requires_grad=requires_grad)
    tensor = torch.frombuffer(segment.mm, dtype=dtype, count=numel).view(dims)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def shared_empty_array(shape: int | Sequence[int], dtype: Any = float) -> Any:
    """A new C-ordered numpy array whose memory is shared memory (contents uninitialised).

    Args:
        shape: Its size, e.g. ``(1024, 1024, 3)``.
        dtype: Anything ``numpy.dtype`` takes (default: float64).

    Returns:
        An array that travels with no copy when sent or returned to another actor (arrays of
        at least 1 MiB travel in shared memory; smaller ones are copied into the message).
    """
    import numpy as np

    dims = _dims(shape)
    dt = np.dtype(dtype)
    segment = _segment(math.prod(dims) * dt.itemsize, "numpy array")
    if segment is None:
        return np.empty(dims, dtype=dt)
    return np.ndarray(dims, dt, buffer=segment.mm)  # type: ignore[arg-type]  # a ctypes array is a buffer
