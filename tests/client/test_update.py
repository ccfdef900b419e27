"""The client side of a round (``fedtransfer.client.update``): the set-up distribution."""

from __future__ import annotations

import torch


def test_set_up_is_exact_for_float64_models():
    from fedtransfer.client.update import SETUP_CODEC, verify_start
    from fedtransfer.tree import sha256

    weights = {"w": torch.randn(3, dtype=torch.float64)}
    back = verify_start(SETUP_CODEC.encode(weights).to_bytes(), sha256(weights), client="c")
    assert back["w"].dtype == torch.float64 and torch.equal(back["w"], weights["w"])
