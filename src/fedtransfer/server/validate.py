"""Validation of decoded client updates: a bad update is rejected, never aggregated."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import UpdateRejected


def validate_update(
    update: Mapping[str, Tensor],
    weight: object,
    *,
    reference: Mapping[str, Tensor],
    client: str,
    round: int,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference`` (the global shared
    parameters) key for key in shape and dtype, holds only finite values, and ``weight`` is a
    finite number > 0."""

    def reject(why: str) -> UpdateRejected:
        return UpdateRejected(f"client {client}, round {round}: {why}", client=client, round=round)

    if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(float(weight)):
        raise reject(
            f"weight {weight!r} is not a finite number; expected the client's example count"
        )
    if not float(weight) > 0:
        raise reject(f"weight {weight!r} must be > 0")
    if update.keys() != reference.keys():
        missing = [k for k in reference if k not in update]
        extra = [k for k in update if k not in reference]
        raise reject(
            f"keys differ from the plan's shared keys: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    floats: list[Tensor] = []
    for key, ref in reference.items():
        value = update[key]
        if not isinstance(value, Tensor):
            raise reject(f"{key!r} is a {type(value).__name__}, expected a tensor")
        if value.shape != ref.shape:
            raise reject(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise reject(f"{key!r} has dtype {value.dtype}, expected {ref.dtype}")
        if value.dtype.is_floating_point and value.numel():
            floats.append(value)
    if not floats or _all_finite(floats):
        return
    for key, value in zip(reference, (update[k] for k in reference), strict=True):
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise reject(f"{key!r} holds {bad} non-finite values (NaN or inf)")


def _all_finite(tensors: list[Tensor]) -> bool:
    """True only if every value is finite, in one cheap reduction per tensor: a sum is NaN or
    inf whenever one of its terms is (inf never cancels to a finite value: inf − inf is NaN).
    A non-finite sum may also be an overflow of finite values, so ``False`` means "check each
    tensor". (The sums add up as Python floats: float64, where float32 sums cannot
    overflow.) A decoded payload's tensors, laid end to end in one buffer, take one reduction
    for them all."""
    whole = tree.flat(tensors)
    if whole is not None:
        return math.isfinite(float(whole.sum()))
    return math.isfinite(sum(float(t.sum()) for t in tensors))
