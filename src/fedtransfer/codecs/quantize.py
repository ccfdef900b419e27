"""``Int8``: affine 8-bit quantisation of floating tensors, per tensor or per output channel."""

from __future__ import annotations

import hashlib
from dataclasses import KW_ONLY, dataclass
from typing import Literal

import torch
from torch import Tensor

from fedtransfer.codecs.cast import restore
from fedtransfer.codecs.checks import (
    CORRUPT_HINT,
    check_expected,
    check_finite,
    check_header,
    check_keys,
    chunked,
    companions,
    meta_dtype,
    pairs,
    plain,
)
from fedtransfer.codecs.payload import Entry, Payload, dtype_name
from fedtransfer.errors import ConfigError, PayloadError
from fedtransfer.types import Params

RANGE = "#range"
"""Suffix of the companion entry that holds a quantised tensor's ``(min, scale)`` rows."""

_LEVELS = 255


@dataclass(frozen=True)
class Int8:
    """Floating tensors travel as one byte per value plus a float ``(min, scale)`` per channel.

    Each value becomes ``q = round((x - min) / scale)`` in ``[0, 255]`` with
    ``scale = (max - min) / 255`` (rounded down to the stored float), and decodes to
    ``min + q * scale`` in the tensor's own dtype.
    ``granularity="channel"`` gives every slice along dim 0 (output channel) its own min and
    scale; tensors with fewer than 2 dims always use one. A constant tensor has scale 0 and
    round-trips exactly. Integer and bool tensors travel as-is; NaN or inf cannot be quantised
    and :meth:`encode` raises, naming the tensor.

    ``stochastic=True`` rounds ``v = (x - min) / scale`` to ``floor(v + u)`` with
    ``u ~ U[0, 1)``, which is unbiased (``E[decode(encode(x))] = x``), as in QSGD (Alistarh et
    al., arXiv:1610.02132). The uniforms come from a ``torch.Generator`` seeded by a hash of
    ``seed``, the tensor's key and its bytes, so encoding stays pure and reproducible, and
    different updates get unrelated noise.

    ``error_bound`` is relative to each tensor's largest magnitude: half a step (``1/255``) for
    round-to-nearest and one step (``2/255``) for stochastic rounding, since
    ``max - min <= 2 max|x|``. Both hold up to float32 rounding (2**-24 relative) for float32
    and float64 tensors; a float16 or bfloat16 tensor adds one rounding to its own dtype.

    Wire layout, in ``params`` order: a floating tensor ``k`` becomes the entry ``k`` (uint8,
    its own shape, meta ``{"dtype": <its dtype>}``) followed by ``k#range`` (shape
    ``[channels, 2]``, columns min and scale; float64 for float64 tensors, else float32; no
    meta). Payload meta is ``{"granularity": ...}``.

    Args:
        granularity: ``"tensor"`` (one min and scale per tensor) or ``"channel"`` (one per dim-0
            slice).
        stochastic: Unbiased stochastic rounding instead of round-to-nearest.
        seed: Mixed into the rounding noise of stochastic rounding.

    >>> import torch
    >>> codec = Int8()
    >>> x = torch.linspace(-1.0, 1.0, 1000)
    >>> payload = codec.encode({"w": x})
    >>> back = codec.decode(payload)["w"]
    >>> bool((back - x).abs().max() <= codec.error_bound), payload.nbytes < x.numel() * 4 / 3
    (True, True)
    """

    granularity: Literal["tensor", "channel"] = "tensor"
    _: KW_ONLY
    stochastic: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "channel"):
            raise ConfigError(
                f"Int8: granularity {self.granularity!r} is not one of 'tensor', 'channel'"
            )
        if not isinstance(self.stochastic, bool):
            raise ConfigError(f"Int8: stochastic must be a bool, got {self.stochastic!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"Int8: seed must be an int, got {self.seed!r}")

    @property
    def error_bound(self) -> float:
        return (2.0 if self.stochastic else 1.0) / _LEVELS

    def encode(self, params: Params) -> Payload:
        companions(params, RANGE, "Int8.encode")
        entries: list[Entry] = []
        for k, v in params.items():
            if not v.dtype.is_floating_point:
                entries.append(Entry(k, v.detach()))
                continue
            q, rows = self._quantize(k, v.detach().cpu())
            entries += [Entry(k, q, {"dtype": dtype_name(v.dtype)}), Entry(k + RANGE, rows)]
        return Payload("int8", tuple(entries), {"granularity": self.granularity})

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        where = "Int8.decode"
        check_header(payload, codec="int8", meta={"granularity": self.granularity}, where=where)
        out: dict[str, Tensor] = {}
        for entry, rows in pairs(payload, RANGE, where):
            out[entry.key] = (
                plain(entry, where, expected)
                if rows is None
                else self._dequantize(entry, rows, expected)
            )
        check_keys(list(out), expected, where)
        return out

    def _quantize(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """The uint8 codes of ``x`` and its ``[channels, 2]`` (min, scale) rows."""
        check_finite(key, x, "Int8.encode")
        kind = torch.float64 if x.dtype == torch.float64 else torch.float32
        channels = _channels(x.shape, self.granularity)
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.uint8), torch.zeros(channels, 2, dtype=kind)
        flat = x.double().reshape(channels, -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        width = hi - lo
        if not bool(torch.isfinite(width).all()):
            raise PayloadError(
                f"Int8.encode: tensor {key!r} spans [{float(lo.min())}, {float(hi.max())}], "
                "a range too wide for float64; hint: use Exact"
            )
        # Round the stored scale down, so that half a step stays within (max - min) / 510 <=
        # max|x| / 255 (the top code then falls short of the maximum by a few ulps), but never
        # to 0 when max > min.
        scale = (width / _LEVELS).to(kind)
        zero = torch.zeros_like(scale)
        scale = torch.where(scale.double() * _LEVELS > width, torch.nextafter(scale, zero), scale)
        tiniest = torch.nextafter(zero, torch.ones_like(scale))
        scale = torch.where((scale == 0) & (width > 0), tiniest, scale)
        step = scale.double()[:, None]
        v = torch.where(step > 0, (flat - lo[:, None]) / step, 0.0)
        v = torch.floor(v + self._uniforms(key, x)) if self.stochastic else torch.round(v)
        codes = v.clamp(0, _LEVELS).to(torch.uint8).reshape(x.shape)
        return codes, torch.stack([lo.to(kind), scale], dim=1)

    def _uniforms(self, key: str, x: Tensor) -> Tensor:
        """U[0, 1) noise shaped like ``x``, determined by ``seed``, ``key`` and ``x``'s bytes."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(f"{self.seed}\0{key}\0{x.dtype}\0{list(x.shape)}\0".encode())
        digest.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        rand = torch.rand(x.numel(), generator=gen, dtype=torch.float64)
        return rand.reshape(_channels(x.shape, self.granularity), -1)

    def _dequantize(self, entry: Entry, rows: Entry, expected: Params | None) -> Tensor:
        where = "Int8.decode"
        codes = entry.tensor
        if codes.dtype != torch.uint8:
            raise PayloadError(
                f"{where}: tensor {entry.key!r} is stored as {codes.dtype}, expected uint8 "
                f"codes; {CORRUPT_HINT}"
            )
        dtype = meta_dtype(entry, frozenset({"dtype"}), where)
        check_expected(entry.key, codes.shape, dtype, expected, where)
        kind = torch.float64 if dtype == torch.float64 else torch.float32
        channels = _channels(codes.shape, self.granularity)
        if rows.tensor.dtype != kind or tuple(rows.tensor.shape) != (channels, 2):
            raise PayloadError(
                f"{where}: {rows.key!r} is {rows.tensor.dtype} of shape "
                f"{list(rows.tensor.shape)}, expected {kind} of shape [{channels}, 2] (min, "
                f"scale per {self.granularity}) for a tensor of shape {list(codes.shape)}; "
                f"{CORRUPT_HINT}"
            )
        lo, scale = rows.tensor.double().unbind(dim=1)
        bad = ~torch.isfinite(rows.tensor).all(dim=1) | (scale < 0)
        if bool(bad.any()):
            row = rows.tensor[bad][0].tolist()
            raise PayloadError(
                f"{where}: {rows.key!r} has (min, scale) = {row}, expected finite values and a "
                f"scale >= 0; {CORRUPT_HINT}"
            )
        if codes.numel() == 0:
            return torch.zeros(codes.shape, dtype=dtype)
        flat, per = codes.reshape(-1), codes.numel() // channels

        def fill(part: slice) -> Tensor:  # lo + code · scale, in float64, a chunk at a time
            row = torch.arange(part.start, part.stop) // per if channels > 1 else 0
            return restore(lo[row] + flat[part].double() * scale[row], dtype)

        return chunked(codes.numel(), dtype, fill).reshape(codes.shape)


def _channels(shape: torch.Size, granularity: str) -> int:
    """How many (min, scale) rows a tensor of ``shape`` has."""
    return shape[0] if granularity == "channel" and len(shape) >= 2 else 1
