"""Validation of decoded client updates: a bad update is rejected, never aggregated."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import ConfigError, UpdateRejected

MAX_INTEGER_UPDATE = 1 << 31
"""The largest magnitude an integer entry of an update may have (a counter's change in one
round: BatchNorm's ``num_batches_tracked`` grows by the batches trained); beyond it a mean of
int64 updates could overflow."""


@dataclass(frozen=True)
class UpdateLimits:
    """What the server refuses of an accepted-looking update, beyond keys, shapes, dtypes and
    finiteness (``Recipe.limits``): an update whose global L2 norm (floating tensors) exceeds
    ``max_update_norm`` is rejected — not clipped: for clipping use ``ClipNorm`` — and a weight
    above the client's example count as the server knows it (from the simulated population,
    or what a deployed client reported when it connected), or, where it knows none, above
    ``max_weight``, is rejected. ``None`` sets no bound. A round with fewer than
    ``min_responses`` accepted updates leaves the model unchanged and says so (its updates
    are rejected, naming the count).

    >>> UpdateLimits(max_update_norm=10.0)
    UpdateLimits(max_update_norm=10.0, max_weight=None, min_responses=1)
    """

    max_update_norm: float | None = None
    max_weight: float | None = None
    min_responses: int = 1

    def __post_init__(self) -> None:
        n = self.min_responses
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"UpdateLimits: min_responses must be an integer >= 1, got {n!r}")
        for name in ("max_update_norm", "max_weight"):
            value = getattr(self, name)
            if value is not None and (_finite(value) is None or not value > 0):
                raise ConfigError(
                    f"UpdateLimits: {name} must be a finite number > 0 or None, got {value!r}"
                )


def validate_update(
    update: Mapping[str, Tensor],
    weight: object,
    *,
    reference: Mapping[str, Tensor],
    client: str,
    round: int,
    limits: UpdateLimits | None = None,
    known_weight: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference`` (the global shared
    parameters) key for key in shape and dtype, holds only finite values (integers of at most
    :data:`MAX_INTEGER_UPDATE`), and ``weight`` is a finite number > 0 — and within the
    ``limits`` (``known_weight``: the client's example count as the server knows it)."""

    def reject(why: str) -> UpdateRejected:
        return UpdateRejected(f"client {client}, round {round}: {why}", client=client, round=round)

    finite = _finite(weight)
    if finite is None:
        raise reject(
            f"weight {_short(weight)} is not a finite number; expected the client's example count"
        )
    if not finite > 0:
        raise reject(f"weight {_short(weight)} must be > 0")
    cap = known_weight
    if cap is None and limits is not None:
        cap = limits.max_weight
    if cap is not None and finite > cap:
        known = "examples the server knows it has" if known_weight is not None else "max_weight"
        raise reject(f"weight {_short(weight)} exceeds the {cap:g} {known}")
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
        elif value.numel() and value.dtype != torch.bool:
            top = max(int(value.max()), -int(value.min()))  # abs() wraps at -2^63
            if top > MAX_INTEGER_UPDATE:
                raise reject(
                    f"{key!r} changes by {top}, more than the {MAX_INTEGER_UPDATE} an integer "
                    "(a counter) may change in a round"
                )
    if floats and not _all_finite(floats):
        _name_non_finite(reference, update, reject)
    bound = limits.max_update_norm if limits is not None else None
    if bound is not None and floats:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in floats))
        if not norm <= bound:
            raise reject(f"update norm {norm:.4g} exceeds max_update_norm {bound:g}")


def _name_non_finite(
    reference: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    reject: Callable[[str], UpdateRejected],
) -> None:
    """Raise naming the first key that holds a NaN or an inf (none: the quick check's sum
    overflowed on finite values, which pass)."""
    for key, value in zip(reference, (update[k] for k in reference), strict=True):
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise reject(f"{key!r} holds {bad} non-finite values (NaN or inf)")


def _finite(weight: object) -> float | None:
    """``weight`` as a finite float, or None: not a real number (a bool, a string), or one no
    float holds (an integer of 400 digits overflows) — a client's word, so never an error."""
    if isinstance(weight, bool) or not isinstance(weight, Real):
        return None
    try:
        value = float(weight)
    except (OverflowError, ValueError, TypeError):
        return None
    return value if math.isfinite(value) else None


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value may be huge); an integer
    too long to print is named by its digit count."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr may refuse it
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


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
