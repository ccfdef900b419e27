"""``TopK``: send only the largest-magnitude entries of each floating tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from fedtransfer.codecs.checks import (
    CORRUPT_HINT,
    check_expected,
    check_finite,
    check_header,
    check_keys,
    companions,
    is_int,
    pairs,
    plain,
)
from fedtransfer.codecs.payload import MAX_DIMS, Entry, Payload
from fedtransfer.errors import ConfigError, PayloadError
from fedtransfer.types import Params

INDICES = "#indices"
"""Suffix of the companion entry that holds a sparsified tensor's flat indices."""

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class TopK:
    """Each floating tensor sends its ``k = max(1, ceil(ratio * numel))`` largest-magnitude entries.

    Kept entries travel exactly, in the tensor's own dtype, with their int32 flat indices;
    dropped entries decode as 0. Ties in magnitude keep the lowest index first, so encoding is
    deterministic. Integer and bool tensors travel as-is; NaN or inf has no rank and
    :meth:`encode` raises, naming the tensor. ``ratio`` is read as the nearest fraction with a
    denominator of at most 10**12, so ``TopK(0.07)`` keeps exactly 7 of 100 entries.

    Top-k sparsification is meant for uplinks (Aji & Heafield, arXiv:1704.05021) together with
    error feedback, the client transform that adds what was dropped to the next round's update;
    without it the dropped mass is lost for good (Stich et al., arXiv:1809.07599).
    ``error_bound`` is 1: a dropped entry is at most the tensor's largest magnitude (and at most
    the smallest kept one).

    Wire layout, in ``params`` order: a floating tensor ``k`` becomes the entry ``k`` (the kept
    values, 1-D, its own dtype, meta ``{"shape": <its shape>}``) followed by ``k#indices``
    (int32, same length, strictly ascending flat indices; no meta). Payload meta is
    ``{"ratio": ratio}``.

    Args:
        ratio: Fraction of each tensor's entries to keep, in (0, 1].

    >>> import torch
    >>> codec = TopK(0.5)
    >>> codec.decode(codec.encode({"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}))["w"]
    tensor([ 0., -3.,  2.,  0.])
    """

    ratio: float = 0.01
    sparse: ClassVar[bool] = True
    """Drops most entries: fit for uplinks only (``Recipe.validate`` refuses it downlink)."""

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
            raise ConfigError(
                f"TopK: ratio must be a number in (0, 1], got {r!r}; hint: ratio=0.01 keeps the "
                "largest 1% of each tensor"
            )

    @property
    def error_bound(self) -> float:
        return 1.0

    def num_kept(self, numel: int) -> int:
        """How many entries a tensor of ``numel`` elements keeps (0 for an empty tensor).

        >>> TopK(0.07).num_kept(100), TopK(0.01).num_kept(5), TopK(0.01).num_kept(0)
        (7, 1, 0)
        """
        if numel == 0:
            return 0
        ratio = Fraction(self.ratio).limit_denominator(10**12)
        return min(numel, max(1, math.ceil(ratio * numel)))

    def encode(self, params: Params) -> Payload:
        companions(params, INDICES, "TopK.encode")
        entries: list[Entry] = []
        for k, v in params.items():
            if not v.dtype.is_floating_point:
                entries.append(Entry(k, v.detach()))
                continue
            values, indices = self._select(k, v.detach())
            entries += [Entry(k, values, {"shape": list(v.shape)}), Entry(k + INDICES, indices)]
        return Payload("topk", tuple(entries), {"ratio": self.ratio})

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        where = "TopK.decode"
        check_header(payload, codec="topk", meta={"ratio": self.ratio}, where=where)
        out: dict[str, Tensor] = {}
        for entry, indices in pairs(payload, INDICES, where):
            out[entry.key] = (
                plain(entry, where, expected)
                if indices is None
                else self._scatter(entry, indices, expected)
            )
        check_keys(list(out), expected, where)
        return out

    def _select(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """The kept values of ``x`` and their ascending int32 flat indices."""
        check_finite(key, x, "TopK.encode")
        if x.numel() > _INT32_MAX:
            raise PayloadError(
                f"TopK.encode: tensor {key!r} has {x.numel()} elements, more than int32 indices "
                f"address ({_INT32_MAX}); hint: split the tensor or use Int8"
            )
        flat = x.reshape(-1)
        k, magnitude = self.num_kept(flat.numel()), flat.abs()
        if k in (0, flat.numel()):
            kept = torch.arange(k, device=flat.device)
        else:
            # Everything above the k-th largest magnitude, then the lowest-index ties with it:
            # linear time, and deterministic where topk's choice among ties is not.
            kth = torch.topk(magnitude, k, sorted=False).values.min()
            above = torch.nonzero(magnitude > kth).reshape(-1)
            ties = torch.nonzero(magnitude == kth).reshape(-1)[: k - above.numel()]
            kept = torch.cat([above, ties]).sort().values
        return flat[kept].clone(), kept.to(torch.int32)

    def _scatter(self, entry: Entry, indices: Entry, expected: Params | None) -> Tensor:
        values, idx = entry.tensor, indices.tensor
        if not values.dtype.is_floating_point or values.dim() != 1:
            raise PayloadError(
                f"TopK.decode: tensor {entry.key!r} is {values.dtype} of shape "
                f"{list(values.shape)}, expected 1-D floating values; {CORRUPT_HINT}"
            )
        shape = _shape(entry)
        check_expected(entry.key, shape, values.dtype, expected, "TopK.decode")
        numel, count = math.prod(shape), values.numel()
        if idx.dtype != torch.int32 or tuple(idx.shape) != (count,):
            raise PayloadError(
                f"TopK.decode: {indices.key!r} is {idx.dtype} of shape {list(idx.shape)}, "
                f"expected int32 of shape [{count}] (one index per value); {CORRUPT_HINT}"
            )
        if count != self.num_kept(numel):
            raise PayloadError(
                f"TopK.decode: tensor {entry.key!r} of shape {shape} sends {count} values, "
                f"expected {self.num_kept(numel)} for ratio {self.ratio}; {CORRUPT_HINT}"
            )
        _check_indices(indices.key, idx, numel)
        out = torch.zeros(numel, dtype=values.dtype)
        out[idx.long()] = values
        return out.reshape(shape)


def _shape(entry: Entry) -> list[int]:
    """The tensor shape recorded in a values entry's meta, validated."""
    if set(entry.meta) != {"shape"}:
        raise PayloadError(
            f"TopK.decode: tensor {entry.key!r} has meta keys {sorted(entry.meta)}, expected "
            f"['shape']; {CORRUPT_HINT}"
        )
    shape = entry.meta["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(is_int(d) and d >= 0 for d in shape)
        or math.prod(shape) > _INT32_MAX
    ):
        raise PayloadError(
            f"TopK.decode: tensor {entry.key!r} records shape {shape!r}, expected at most "
            f"{MAX_DIMS} non-negative ints with at most {_INT32_MAX} elements; {CORRUPT_HINT}"
        )
    return shape


def _check_indices(key: str, idx: Tensor, numel: int) -> None:
    """Raise unless ``idx`` is strictly ascending within ``[0, numel)``."""
    if idx.numel() == 0:
        return
    steps = torch.nonzero(idx[1:] <= idx[:-1])
    if steps.numel():
        i = int(steps[0])
        raise PayloadError(
            f"TopK.decode: {key!r} has index {int(idx[i + 1])} after {int(idx[i])} at position "
            f"{i + 1}, expected strictly ascending (sorted, no duplicates); {CORRUPT_HINT}"
        )
    if int(idx[0]) < 0 or int(idx[-1]) >= numel:
        bad = int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])
        raise PayloadError(
            f"TopK.decode: {key!r} has index {bad}, expected indices in [0, {numel}); {CORRUPT_HINT}"
        )
