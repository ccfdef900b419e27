"""Pure operations on :data:`~fedtransfer.types.Params` (mappings of state-dict key to tensor).

Every function returns new tensors and never mutates its inputs. Integer tensors (such as
BatchNorm's ``num_batches_tracked``) are combined in float64 and rounded back to their dtype.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from fedtransfer.types import Params


def _check_same_keys(a: Params, b: Params, op: str) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:5]
        extra = sorted(set(b) - set(a))[:5]
        raise ValueError(
            f"tree.{op}: key sets differ; only in first {missing}, only in second {extra}"
        )


def _cast_like(value: Tensor, like: Tensor) -> Tensor:
    if like.dtype.is_floating_point or like.dtype.is_complex:
        return value.to(like.dtype)
    return torch.round(value).to(like.dtype)


def add(a: Params, b: Params) -> dict[str, Tensor]:
    """``a + b`` key by key."""
    _check_same_keys(a, b, "add")
    return {k: a[k] + b[k].to(a[k].dtype) for k in a}


def sub(a: Params, b: Params) -> dict[str, Tensor]:
    """``a - b`` key by key."""
    _check_same_keys(a, b, "sub")
    return {k: a[k] - b[k].to(a[k].dtype) for k in a}


def scale(a: Params, factor: float) -> dict[str, Tensor]:
    """``factor * a`` key by key (integer tensors are rounded back)."""
    return {k: _cast_like(v.double() * factor, v) for k, v in a.items()}


def zeros_like(a: Params) -> dict[str, Tensor]:
    """Zeros with the keys, shapes and dtypes of ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Params) -> dict[str, Tensor]:
    """A deep copy with contiguous, detached tensors."""
    return {k: v.detach().clone().contiguous() for k, v in a.items()}


def flat(tensors: Sequence[Tensor]) -> Tensor | None:
    """The 1-D tensor whose consecutive pieces are exactly ``tensors`` (in order), when they are
    contiguous views laid end to end in one storage with one dtype (as a decoded payload's
    tensors are); else ``None``. Element-wise work on it is the same arithmetic as on each
    piece, in one call instead of one per tensor.

    >>> import torch
    >>> buf = torch.arange(5.0)
    >>> flat([buf[:2].view(2, 1), buf[2:]]).tolist(), flat([buf[:2], buf[3:]])
    ([0.0, 1.0, 2.0, 3.0, 4.0], None)
    """
    if not tensors:
        return None
    first = tensors[0]
    if first.requires_grad or first.layout != torch.strided:
        return None
    offset, size = first.storage_offset(), first.element_size()
    base = first.data_ptr() - offset * size
    end = offset
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.storage_offset() != end
            or t.data_ptr() - end * size != base
            or t.requires_grad
            or not t.is_contiguous()
        ):
            return None
        end += t.numel()
    return first.as_strided((end - offset,), (1,), offset)


def weighted_mean(trees: Sequence[Params], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted mean ``sum_i w_i t_i / sum_i w_i``, accumulated in float64.

    >>> import torch
    >>> weighted_mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}], [1.0, 2.0])
    {'w': tensor([2.])}
    """
    if not trees:
        raise ValueError("tree.weighted_mean: no trees given; expected at least one")
    if len(trees) != len(weights):
        raise ValueError(f"tree.weighted_mean: {len(trees)} trees but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"tree.weighted_mean: weights must sum to > 0, got {total}")
    first = trees[0]
    for t in trees[1:]:
        _check_same_keys(first, t, "weighted_mean")
    keys = list(first)
    sizes = [first[k].numel() for k in keys]
    acc = torch.zeros(sum(sizes), dtype=torch.float64)  # every key's accumulator, end to end
    accs = [a.view(first[k].shape) for a, k in zip(acc.split(sizes), keys, strict=True)]
    for t, w in zip(trees, weights, strict=True):
        if not w or not keys:
            continue
        # promote, scale, add: separate roundings, the same arithmetic as
        # ``acc += t.double() * w`` (a fused multiply-add would round once and change the bits
        # of every run's trajectory) — on the whole tree at once when its tensors lie end to
        # end (a decoded payload), else in one call per tree for each step
        values = [t[k] for k in keys]
        for k, v in zip(keys, values, strict=True):
            if v.shape != first[k].shape:
                raise ValueError(
                    f"tree.weighted_mean: {k!r} has shape {tuple(v.shape)} in one tree and "
                    f"{tuple(first[k].shape)} in the first"
                )
        whole = flat(values)
        if whole is not None:
            # (a copy even of a float64 tree: never scale the input in place)
            acc.add_(whole.to(torch.float64, copy=True).mul_(float(w) / total))
        else:
            torch._foreach_add_(
                accs, torch._foreach_mul([v.double() for v in values], float(w) / total)
            )
    return {k: _cast_like(a, first[k]) for k, a in zip(keys, accs, strict=True)}


def global_norm(a: Params) -> float:
    """L2 norm of all floating tensors of ``a`` taken as one vector."""
    sq = sum(float(v.double().pow(2).sum()) for v in a.values() if v.dtype.is_floating_point)
    return float(sq) ** 0.5


def select(a: Params, keys: Iterable[str]) -> dict[str, Tensor]:
    """The sub-mapping of ``a`` with ``keys`` (in the order given); missing keys are an error."""
    keys = list(keys)
    missing = [k for k in keys if k not in a]
    if missing:
        raise KeyError(f"tree.select: keys not present: {missing[:5]}")
    return {k: a[k] for k in keys}


def cast(a: Params, dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors cast to ``dtype``; other tensors unchanged."""
    return {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in a.items()}


def all_finite(a: Params) -> bool:
    """True when no floating tensor holds NaN or infinity."""
    return all(bool(torch.isfinite(v).all()) for v in a.values() if v.dtype.is_floating_point)


def equal(a: Params, b: Params) -> bool:
    """Bit-for-bit equality of two mappings (keys, dtypes, shapes and values)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(a: Params) -> str:
    """Content hash of a mapping: sorted keys, dtypes, shapes and raw bytes.

    Independent of file layout, so a checkpoint and its decoded payload hash the same.
    """
    h = hashlib.sha256()
    for k in sorted(a):
        v = a[k].detach().contiguous().cpu()
        h.update(f"{k}|{str(v.dtype).removeprefix('torch.')}|{list(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
