"""Derived seeds: every random choice is a function of (run seed, purpose, round, client)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """Return a 63-bit seed determined only by ``seed`` and ``parts``.

    Never touches a global RNG, so results do not depend on call order.

    >>> derive_seed(0, "train", 3, "client-7") == derive_seed(0, "train", 3, "client-7")
    True
    >>> derive_seed(0, "train", 3) != derive_seed(0, "train", 4)
    True
    """
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts))
    return gen
