"""Contract suite for aggregators, in the manner of scikit-learn's ``check_estimator``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import Tensor

from fedtransfer import tree
from fedtransfer.server import (
    Aggregator,
    Bulyan,
    CenteredClipping,
    Krum,
    Mean,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
)

AGGREGATORS: list[Aggregator] = [
    Mean(),
    Mean(weighted=False),
    Median(),
    TrimmedMean(beta=0.2),
    Krum(f=1),
    MultiKrum(f=1, m=3),
    MultiKrum(f=1),
    Bulyan(f=1),
    CenteredClipping(tau=1.0, iters=3),
    NormBound(c=1.0),
]
# Rules that shrink updates outside a radius (both radii above are 1.0; random updates here have
# norm ~4, so clipping is active and these rules are not linear).
CLIPPING = (CenteredClipping, NormBound)
# Clients with positive weight in every test: enough for each rule above (Bulyan with f = 1
# needs 4f + 3 = 7; Krum and MultiKrum 2f + 3 = 5).
N = 7
WEIGHTED: list[Aggregator] = [a for a in AGGREGATORS if getattr(a, "weighted", False)]


@pytest.fixture(params=AGGREGATORS, ids=repr)
def aggregator(request: pytest.FixtureRequest) -> Aggregator:
    return request.param


def _update(gen: torch.Generator, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {
        "layer.weight": torch.randn(3, 4, generator=gen, dtype=dtype),
        "layer.bias": torch.randn(3, generator=gen, dtype=dtype),
    }


def _updates(n: int, seed: int, *, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [_update(gen, dtype=dtype) for _ in range(n)]


def _params() -> dict[str, Tensor]:
    return {"layer.weight": torch.zeros(3, 4), "layer.bias": torch.zeros(3)}


def test_aggregator_is_an_aggregator(aggregator: Aggregator) -> None:
    """``aggregate`` combines the updates into one update of their layout, inside their
    coordinate-wise range (widened to 0, as clipping shrinks towards it), not all zero; the
    state is a flat dict of tensors and ``linear`` a bool."""
    assert isinstance(aggregator, Aggregator)
    assert isinstance(type(aggregator).linear, bool)
    updates = _updates(N, seed=7)
    out = aggregator.aggregate(
        updates, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0], aggregator.init(_params())
    )
    assert {k: (v.shape, v.dtype) for k, v in out.value.items()} == {
        k: (v.shape, v.dtype) for k, v in updates[0].items()
    }
    for k, v in out.value.items():
        stacked = torch.stack([u[k] for u in updates])
        low = torch.clamp(stacked.min(dim=0).values, max=0.0)
        high = torch.clamp(stacked.max(dim=0).values, min=0.0)
        assert bool(((v >= low - 1e-6) & (v <= high + 1e-6)).all()), k
    assert tree.global_norm(out.value) > 0
    assert isinstance(out.state, dict)
    assert all(isinstance(k, str) and isinstance(v, Tensor) for k, v in out.state.items())


def test_aggregator_is_permutation_invariant(aggregator: Aggregator) -> None:
    updates, weights = _updates(N + 1, seed=1), [3.0, 1.0, 7.0, 2.0, 5.0, 4.0, 6.0, 8.0]
    state = aggregator.init(_params())
    perm = [3, 0, 7, 4, 2, 6, 1, 5]
    a = aggregator.aggregate(updates, weights, state).value
    b = aggregator.aggregate([updates[i] for i in perm], [weights[i] for i in perm], state).value
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_aggregator_identical_updates_aggregate_to_themselves(aggregator: Aggregator) -> None:
    (one,) = _updates(1, seed=2)
    if isinstance(aggregator, CLIPPING):
        # Clipping rules return a consensus update unchanged only inside their radius (1.0):
        # outside it they shrink it by design, so they are checked with an update of norm 0.5.
        one = tree.scale(one, 0.5 / tree.global_norm(one))
    one["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    weights = [1.0, 2.0, 6.0, 1.0, 3.0, 5.0, 4.0]
    out = aggregator.aggregate([one] * N, weights, aggregator.init(one)).value
    assert tree.equal(out, one)


def test_aggregator_ignores_zero_weight_clients(aggregator: Aggregator) -> None:
    updates = _updates(N + 2, seed=3)
    weights = [2.0, 0.0, 3.0, 1.0, 5.0, 0.0, 4.0, 2.0, 6.0]
    state = aggregator.init(_params())
    with_zero = aggregator.aggregate(updates, weights, state).value
    kept = [i for i, w in enumerate(weights) if w > 0]
    without = aggregator.aggregate([updates[i] for i in kept], [weights[i] for i in kept], state)
    assert tree.equal(with_zero, without.value)


def test_aggregator_ignores_non_finite_values_of_zero_weight_clients(
    aggregator: Aggregator,
) -> None:
    updates = _updates(N + 2, seed=4)
    for i in (1, 5):
        updates[i] = {k: torch.full_like(v, float("nan")) for k, v in updates[i].items()}
    weights = [1.0, 0.0, 4.0, 2.0, 3.0, 0.0, 1.0, 5.0, 2.0]
    out = aggregator.aggregate(updates, weights, aggregator.init(_params())).value
    assert tree.all_finite(out)


@pytest.mark.parametrize("aggregator", WEIGHTED, ids=repr)
def test_weighted_aggregator_weights_by_example_count(aggregator: Aggregator) -> None:
    u = [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([4.0, 5.0])}]
    out = aggregator.aggregate(u, [3.0, 1.0], aggregator.init(u[0])).value
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0]))


def _superposition_holds(aggregator: Aggregator, case: int) -> bool:
    """Whether ``aggregate(a*u + b*v) == a*aggregate(u) + b*aggregate(v)`` on a random case."""
    gen = torch.Generator().manual_seed(100 + case)
    n = N + case
    u = [_update(gen, dtype=torch.float64) for _ in range(n)]
    v = [_update(gen, dtype=torch.float64) for _ in range(n)]
    weights = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1).tolist()
    a, b = (float(x) for x in torch.randn(2, generator=gen, dtype=torch.float64))
    state = aggregator.init(u[0])
    mixed = [tree.add(tree.scale(ui, a), tree.scale(vi, b)) for ui, vi in zip(u, v, strict=True)]
    lhs = aggregator.aggregate(mixed, weights, state).value
    rhs = tree.add(
        tree.scale(aggregator.aggregate(u, weights, state).value, a),
        tree.scale(aggregator.aggregate(v, weights, state).value, b),
    )
    return all(torch.allclose(lhs[k], rhs[k], rtol=1e-10, atol=1e-12) for k in lhs)


def test_aggregator_linear_flag_is_truthful(aggregator: Aggregator) -> None:
    holds = all(_superposition_holds(aggregator, case) for case in range(8))
    assert holds == aggregator.linear


def test_aggregator_state_roundtrips_through_safetensors(aggregator: Aggregator) -> None:
    params = _params()
    state = aggregator.init(params)
    out = aggregator.aggregate(_updates(N, seed=5), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0], state)
    for s in (state, out.state):
        assert isinstance(s, dict)
        assert all(isinstance(k, str) and isinstance(v, Tensor) for k, v in s.items())
        assert tree.equal(load(save(dict(s))), s)


def test_aggregator_does_not_mutate_updates(aggregator: Aggregator) -> None:
    updates = _updates(N, seed=6)
    before = [tree.clone(u) for u in updates]
    aggregator.aggregate(updates, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0], aggregator.init(_params()))
    assert all(tree.equal(u, b) for u, b in zip(updates, before, strict=True))
