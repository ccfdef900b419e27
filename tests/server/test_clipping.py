"""ClipNorm, the per-client clip, and NormBound = ClipNorm + Mean."""

from __future__ import annotations

import pytest
import torch

from fedtransfer import ConfigError, Recipe
from fedtransfer.deploy.secure import norm_bound
from fedtransfer.server import ClipNorm, Mean, Median, NormBound, ServerPipeline


def test_clip_norm_scales_only_updates_over_the_bound_in_float64() -> None:
    clip = ClipNorm(c=1.0)
    big = clip.apply({"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}, {}, {})
    assert torch.allclose(big.value["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert big.value["w"].dtype == torch.float64
    assert torch.equal(big.value["n"], torch.tensor(7)) and big.metrics == {"clipped": 1.0}
    small = clip.apply({"w": torch.tensor([0.3, 0.4])}, {}, {})
    assert torch.equal(small.value["w"], torch.tensor([0.3, 0.4]).double())
    assert small.metrics == {"clipped": 0.0}


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
    b = two.apply(updates, weights, params=params, state=two.init(params))
    assert a.value.keys() == b.value.keys()
    for k in a.value:
        assert a.value[k].dtype == params[k].dtype == b.value[k].dtype
        assert torch.equal(a.value[k], b.value[k]), k
    assert a.metrics["aggregator/clipped"] == b.metrics["per_client/0/clipped"] == 2.0
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
