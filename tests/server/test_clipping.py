"""ClipNorm, the per-client clip, and NormBound = ClipNorm + Mean."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_model

from fedtransfer import ConfigError, Recipe
from fedtransfer.codecs import Float32
from fedtransfer.deploy.secure import norm_bound
from fedtransfer.server import ClipNorm, Mean, Median, NormBound, ServerPipeline
from fedtransfer.types import UpdateContext

CTX = UpdateContext({})


def test_clip_norm_scales_only_updates_over_the_bound_in_float64_back_to_their_dtype() -> None:
    clip = ClipNorm(c=1.0)
    w = torch.tensor([3.0, 4.0, 1e-7])
    big = clip.apply({"w": w, "n": torch.tensor(7)}, {}, CTX)
    scale = 1.0 / float(w.double().norm())
    assert torch.equal(big.value["w"], (w.double() * scale).float())  # scaled in float64
    assert big.value["w"].dtype == torch.float32
    assert torch.equal(big.value["n"], torch.tensor(7)) and big.metrics == {"clipped": 1.0}
    small = clip.apply({"w": torch.tensor([0.3, 0.4])}, {}, CTX)
    assert torch.equal(small.value["w"], torch.tensor([0.3, 0.4]))
    assert small.metrics == {"clipped": 0.0}


def test_clip_norm_as_a_client_transform_clips_what_the_client_sends() -> None:
    """One protocol on both sides: the same ClipNorm, placed in client_transforms."""
    clip = ClipNorm(c=0.5)
    ctx = UpdateContext({}, client="c0", uplink=Float32())
    out = clip.apply({"w": torch.tensor([3.0, 4.0])}, clip.init({}), ctx)
    torch.testing.assert_close(out.value["w"], torch.tensor([0.3, 0.4]))
    Recipe(client_transforms=(clip,)).validate(make_tiny_model())


def test_clip_norm_refuses_a_radius_that_is_not_positive() -> None:
    with pytest.raises(ConfigError, match="ClipNorm"):
        ClipNorm(c=0.0)


def test_norm_bound_is_clip_norm_then_the_mean_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.zeros(5), "b": torch.zeros(2), "n": torch.tensor(0)}
    updates = [
        {
            "w": torch.randn(5, generator=gen) * s,
            "b": torch.randn(2, generator=gen) * s,
            "n": torch.tensor(i),
        }
        for i, s in enumerate((0.1, 3.0, 10.0))
    ]
    weights = [5.0, 2.0, 1.0]
    one = ServerPipeline(aggregator=NormBound(c=1.0))
    two = ServerPipeline(per_client=(ClipNorm(c=1.0),), aggregator=Mean())
    a = one.apply(updates, weights, params=params, state=one.init(params))
    state, admitted = two.init(params), []
    for i, u in enumerate(updates):  # as the round's collect admits each update
        out = two.admit(u, state, UpdateContext(params, client=f"c{i}"))
        admitted.append(out.value)
        state, clipped = out.state, out.metrics
    b = two.apply(admitted, weights, params=params, state=state)
    assert a.value.keys() == b.value.keys()
    for k in a.value:
        assert a.value[k].dtype == params[k].dtype == b.value[k].dtype
        assert torch.equal(a.value[k], b.value[k]), k
    assert a.metrics["aggregator/clipped"] == 2.0 and clipped == {"per_client/0/clipped": 1.0}
    norm = float(torch.cat([a.value["w"], a.value["b"]]).norm())
    assert 0 < norm <= 1.0 + 1e-6


def test_secure_aggregation_reads_the_clip_radius_from_either_form() -> None:
    assert norm_bound(Recipe(pipeline=ServerPipeline(aggregator=NormBound(c=0.5)))) == 0.5
    clipped = ServerPipeline(per_client=(ClipNorm(c=0.25),), aggregator=Mean())
    assert norm_bound(Recipe(pipeline=clipped)) == 0.25
    robust = ServerPipeline(per_client=(ClipNorm(c=0.25),), aggregator=Median())
    with pytest.raises(ConfigError, match="individual updates"):
        norm_bound(Recipe(pipeline=robust))
    with pytest.raises(ConfigError, match="expected norm_bound"):
        norm_bound(Recipe())
