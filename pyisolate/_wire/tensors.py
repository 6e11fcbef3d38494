"""Tensors as shared-memory handles: the only module that imports torch, and lazily.

A CPU tensor travels as the id of a segment (a sealed memfd, see ``shm``) holding its
storage plus its metadata (dtype, shape, stride, storage offset, requires_grad); the body
never carries its data. A tensor whose storage is not shared yet is moved into a segment
once (one copy, into a warm segment of the pool where it fits): its storage is replaced in
place, so later sends of it, or of views made from it afterwards, cost one small message. A
tensor made by ``shared_empty`` is born in a segment and needs no copy at all. A layout in
which two indexes share memory (``expand()``, zero or overlapping strides) travels as a
contiguous copy, and is refused on receipt. Where shared memory has no room, the tensor's
data travels as a copy in a buffer frame (handle: the frame's index), with one warning per
process. A CUDA tensor travels as a CUDA IPC handle (torch's own, reference counted by
torch), and its data stays on its device; only between actors that share CUDA tensors
(``ExtensionConfig.share_cuda_ipc``): to or from another, one fails with EncodeError where
it is sent, and is refused with DecodeError where it arrives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..errors import EncodeError
from . import shm as _shm
from .base import Buffer, DecodeError, _to_buffer

__all__ = ["decode_tensor", "encode_tensor", "is_tensor"]

_MAX_DIMS = 64
_ALLOWED_DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2",
})  # fmt: skip


def is_tensor(obj: object) -> bool:
    """Whether ``obj`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def encode_tensor(t: Any, dest: bytes, cuda_refused: str | None = None) -> list[object]:
    """The wire payload of tensor ``t`` sent to ``dest``; pins its segment until acknowledged.

    ``cuda_refused``: why a CUDA tensor may not go to ``dest`` (None: it may).
    """
    import torch

    meta = [str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), t.storage_offset(),
            bool(t.requires_grad)]
    apart = not _shm.shares_with(dest)
    if t.is_cuda and apart:  # another machine: through host memory, arriving as a CPU tensor
        t = t.detach().cpu()
    if t.is_cuda:
        if cuda_refused is not None:
            raise EncodeError(f"a CUDA tensor cannot be sent to {dest.decode(errors='replace')!r}: {cuda_refused}; "
                              "move it to the CPU first (tensor.cpu())")
        handle = t.untyped_storage()._share_cuda_()
        return ["cuda", *meta, [h if not isinstance(h, str) else h.encode() for h in handle]]
    if t.device.type != "cpu":
        raise TypeError(f"tensors on {t.device.type!r} cannot be shared; move them to the CPU or CUDA")
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return ["cpu", *meta, None]
    if _shm.extent(t.shape, t.stride(), 1) is None:  # two indexes share memory: send it dense
        t = t.detach().clone(memory_format=torch.contiguous_format)
        meta[2], meta[3] = list(t.stride()), 0
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
    if apart:
        return ["cpu", *meta[:2], list(t.stride()) if t.is_contiguous() else _dense_strides(t), 0, meta[4],
                _to_buffer(_frame_of(t))]
    try:
        segment = _shm.find(storage.data_ptr())
        if segment is None or _shm.copies_forward(segment, dest):
            segment = _move_to_shm(t, storage, nbytes, torch, dest)
        return ["cpu", *meta, _shm.share(dest, segment)]
    except _shm.NoRoom as exc:
        _shm.warn_copy(exc, "tensor")
    dense = t.detach().contiguous()
    data = bytearray(dense.numel() * dense.element_size())
    if data:
        torch.frombuffer(data, dtype=torch.uint8).copy_(dense.reshape(-1).view(torch.uint8))
    meta[2], meta[3] = list(dense.stride()), 0
    return ["cpu", *meta, _to_buffer(memoryview(data))]


def _dense_strides(t: Any) -> list[int]:
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


def _frame_of(t: Any) -> memoryview:
    """The bytes of ``t`` for a buffer frame: its own memory where it is dense (zero-copy), else a
    dense copy."""
    import torch

    dense = t.detach().contiguous()
    try:
        return memoryview(dense.reshape(-1).view(torch.uint8).numpy())  # the array keeps the tensor alive
    except (RuntimeError, TypeError):  # torch without numpy: a copy
        data = bytearray(dense.numel() * dense.element_size())
        if data:
            torch.frombuffer(data, dtype=torch.uint8).copy_(dense.reshape(-1).view(torch.uint8))
        return memoryview(data)


def _move_to_shm(t: Any, storage: Any, nbytes: int, torch: Any, dest: bytes) -> _shm.Segment:
    segment = _shm.new_segment(nbytes, dest)
    shared = torch.frombuffer(segment.mm, dtype=torch.uint8)  # the whole segment: a pooled one may be larger
    shared[:nbytes].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
    try:
        with torch.no_grad():
            t.set_(shared.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    except RuntimeError:
        pass  # autograd forbids swapping this tensor's storage: send the copy, keep it private
    return segment


def decode_tensor(fields: list[Any], sender: str, sender_in_host: bool, owe: _shm.Owe | None,
                  take: Callable[[object], Buffer] | None = None, cuda_refused: str | None = None) -> Any:
    """Rebuild a tensor from its payload, after checking every field against the segment.

    ``owe``: releases the segment to ``sender`` once no tensor here uses it any more.
    ``cuda_refused``: why a CUDA tensor from ``sender`` is not accepted (None: it is).
    """
    if cuda_refused is not None and fields and fields[0] == "cuda":
        raise DecodeError(f"a CUDA tensor from {sender!r} is refused: {cuda_refused}; the sender must move it to "
                          "the CPU first (tensor.cpu())")
    try:
        import torch
    except ImportError:
        raise DecodeError("received a torch tensor, but torch is not installed in this process") from None
    if len(fields) != 7 or fields[0] not in ("cpu", "cuda"):
        raise DecodeError("malformed tensor payload")
    device, dtype_name, shape, stride, offset, requires_grad, handle = fields
    if dtype_name not in _ALLOWED_DTYPES or not hasattr(torch, dtype_name):
        raise DecodeError(f"unsupported tensor dtype {dtype_name!r}")
    dtype = getattr(torch, dtype_name)
    if not (_ints(shape) and _ints(stride) and len(shape) == len(stride) <= _MAX_DIMS
            and type(offset) is int and offset >= 0 and type(requires_grad) is bool):
        raise DecodeError("malformed tensor shape, stride or offset")
    if device == "cuda":
        extent: int | None = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        assert extent is not None
        tensor = _open_cuda(torch, handle, dtype, shape, stride, offset, (offset + extent) * dtype.itemsize)
    elif (extent := _shm.extent(shape, stride, 1)) is None:
        raise DecodeError("a tensor handle whose elements share memory (zero or overlapping strides) is refused")
    elif handle is None:
        if extent:
            raise DecodeError("a tensor with data needs a shared-memory segment")
        tensor = torch.empty_strided(shape, stride, dtype=dtype)
    elif type(handle) is int:
        tensor = _from_frame(torch, take, handle, dtype, shape, stride, offset)
    else:
        try:
            segment = _shm.receive(handle, sender, (offset + extent) * dtype.itemsize, sender_in_host, owe)
        except _shm.RefusedHandle as exc:
            raise DecodeError(str(exc)) from None
        storage = torch.frombuffer(segment.mm, dtype=torch.uint8).untyped_storage()
        tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _from_frame(torch: Any, take: Callable[[object], Buffer] | None, index: int, dtype: Any,
                shape: list[int], stride: list[int], offset: int) -> Any:
    """A tensor whose data came in a buffer frame (shared memory had no room, or the sender
    shares none with us)."""
    if take is None:
        raise DecodeError("a tensor in a buffer frame is not accepted here")
    numel, dense = 1, [0] * len(shape)
    for i in reversed(range(len(shape))):  # C order, as torch gives a contiguous tensor
        dense[i] = numel
        numel *= shape[i]
    if offset != 0 or (numel and dense != stride):
        raise DecodeError("a tensor in a buffer frame must be contiguous from its start")
    frame = take(index)
    if memoryview(frame).nbytes != numel * dtype.itemsize:
        raise DecodeError(f"a tensor of shape {shape} and dtype {dtype} needs {numel * dtype.itemsize} bytes, "
                          f"its frame holds {memoryview(frame).nbytes}")
    view = memoryview(frame)
    # Ours and writable, as a received tensor is: a frame received from a tcp peer, kept in
    # libzmq's buffer (writable, held by nothing else), is used in place; bytes are copied.
    data = view if not view.readonly else bytearray(frame)
    if not view.nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _open_cuda(torch: Any, handle: object, dtype: Any, shape: list[int], stride: list[int], offset: int,
               needed: int) -> Any:
    if not isinstance(handle, list) or len(handle) != 8:
        raise DecodeError("malformed CUDA IPC handle")
    if not torch.cuda.is_available():
        raise DecodeError("received a CUDA tensor, but CUDA is not available in this process")
    device, ipc, size, storage_offset, ref_handle, ref_offset, event, event_sync = handle
    if not (type(device) is int and type(size) is int and type(storage_offset) is int and type(ref_offset) is int):
        raise DecodeError("malformed CUDA IPC handle")
    if needed > size:  # checked before anything is opened
        raise DecodeError("CUDA tensor handle reaches past its storage")
    with torch.cuda.device(device):
        storage = torch.UntypedStorage._new_shared_cuda(
            device, ipc, size, storage_offset, ref_handle, ref_offset, event, event_sync
        )
    return torch.empty(0, dtype=dtype, device=f"cuda:{device}").set_(storage, offset, shape, stride)

