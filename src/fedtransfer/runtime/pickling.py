"""Pickling for the trip to a worker: dense CPU tensors travel as their raw bytes.

A dense, detached, ordinary CPU tensor is pickled as its raw bytes (a protocol-5 buffer), so a
view pickles only its own elements, never the whole storage it belongs to, and a permuted
dense layout (e.g. channels-last) keeps its strides; any other tensor pickles as torch pickles
it. :func:`_picklers` builds, over a given pickler class (the standard one, or cloudpickle's
for Ray), one pickler by value and one that sends chosen inputs by token (see
:class:`~fedtransfer.runtime.transport.Encoder`). It knows nothing of federated learning.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections import ChainMap
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import torch
from torch import Tensor

PROTOCOL = 5


def _plain(t: Tensor) -> bool:
    """A dense, detached, ordinary CPU tensor (the kind pickled as its raw bytes)."""
    return (
        type(t) is Tensor
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and not t.requires_grad
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
    )


def _dense(t: Tensor) -> bool:
    """The elements fill a storage span without gaps or overlap (a permuted contiguous layout)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _reduce_tensor(t: Tensor) -> Any:
    if not _plain(t):
        return t.__reduce_ex__(PROTOCOL)
    stride: tuple[int, ...] | None = None
    if t.is_contiguous():
        flat = t.reshape(-1)
    elif _dense(t):  # keep the memory format (e.g. channels-last): kernels may depend on it
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset())
        stride = tuple(t.stride())
    else:
        flat = t.contiguous().reshape(-1)
    raw = pickle.PickleBuffer(cast(Any, flat.view(torch.uint8).numpy()))
    return _rebuild_tensor, (t.dtype, tuple(t.shape), stride, raw)


def _rebuild_tensor(
    dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...] | None, raw: Any
) -> Tensor:
    if len(raw) == 0:
        if stride is None:
            return torch.empty(shape, dtype=dtype)
        return torch.empty_strided(shape, stride, dtype=dtype)
    if not isinstance(raw, bytearray):
        raw = bytearray(raw)
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
    return flat.view(shape) if stride is None else flat.as_strided(shape, stride)


def _picklers(base: type[pickle.Pickler]) -> tuple[type[Any], type[Any]]:
    """Two picklers over ``base``: by value, and with a ``persistent`` hook (inputs by token)."""
    inherited = getattr(base, "dispatch_table", None)  # C pickler: a descriptor, not a table
    if not isinstance(inherited, MutableMapping):
        inherited = copyreg.dispatch_table
    table: ChainMap[Any, Any] = ChainMap({Tensor: _reduce_tensor}, inherited)

    class ByValue(base):  # type: ignore[valid-type,misc]
        dispatch_table = table

    class WithTokens(base):  # type: ignore[valid-type,misc]
        dispatch_table = table

        def __init__(self, file: io.BytesIO, persistent: Callable[[Any], Any]) -> None:
            super().__init__(file, protocol=PROTOCOL)
            self._persistent = persistent

        def persistent_id(self, obj: Any) -> Any:
            return self._persistent(obj)

    return ByValue, WithTokens


def dumps(obj: Any, base: type[pickle.Pickler] = pickle.Pickler) -> bytes:
    """``obj`` pickled with tensors as raw bytes."""
    buf = io.BytesIO()
    _picklers(base)[0](buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()
