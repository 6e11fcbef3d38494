"""Tensors as shared-memory handles: the only module that imports torch, and lazily.

A CPU tensor travels as the name of a /dev/shm segment holding its storage plus its metadata
(dtype, shape, stride, storage offset, requires_grad); the body never carries its data. A
tensor whose storage is not shared yet is moved into a new segment once (one copy): its
storage is replaced in place, so later sends of it, or of views made from it afterwards, cost
one small message. A CUDA tensor travels as a CUDA IPC handle (torch's own, reference counted
by torch), and its data stays on its device.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _shm
from ._codec_base import DecodeError

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


def encode_tensor(t: Any, dest: bytes) -> list[object]:
    """The wire payload of tensor ``t`` sent to ``dest``; pins its segment until acknowledged."""
    import torch

    meta = [str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), t.storage_offset(),
            bool(t.requires_grad)]
    if t.is_cuda:
        handle = t.untyped_storage()._share_cuda_()
        return ["cuda", *meta, [h if not isinstance(h, str) else h.encode() for h in handle]]
    if t.device.type != "cpu":
        raise TypeError(f"tensors on {t.device.type!r} cannot be shared; move them to the CPU or CUDA")
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return ["cpu", *meta, None]
    segment = _shm.find(storage.data_ptr())
    if segment is None:
        segment = _move_to_shm(t, storage, nbytes, torch)
    _shm.pin(dest, segment)
    return ["cpu", *meta, segment.name]


def _move_to_shm(t: Any, storage: Any, nbytes: int, torch: Any) -> _shm.Segment:
    segment = _shm.create(nbytes)
    shared = torch.frombuffer(segment.mm, dtype=torch.uint8)
    shared.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
    try:
        with torch.no_grad():
            t.set_(shared.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    except RuntimeError:
        pass  # autograd forbids swapping this tensor's storage: send the copy, keep it private
    return segment


def decode_tensor(fields: list[Any], sender: str, sender_in_host: bool, acks: list[str]) -> Any:
    """Rebuild a tensor from its payload, after checking every field against the segment."""
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
    extent = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    needed = (offset + extent) * dtype.itemsize
    if device == "cuda":
        tensor = _open_cuda(torch, handle, dtype, shape, stride, offset, needed)
    elif handle is None:
        if needed:
            raise DecodeError("a tensor with data needs a shared-memory segment")
        tensor = torch.empty_strided(shape, stride, dtype=dtype)
    else:
        try:
            segment = _shm.receive(handle, sender, needed, sender_in_host)
        except _shm.RefusedHandle as exc:
            raise DecodeError(str(exc)) from None
        acks.append(handle)
        storage = torch.frombuffer(segment.mm, dtype=torch.uint8).untyped_storage()
        tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


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

