"""Golden tests of the robust aggregators: hand-computed cases and their robustness guarantees.

Honest updates are clustered around a common point; attackers send far-away values (the
setting of Blanchard et al., arXiv 1703.02757, and Yin et al., arXiv 1803.01498). Each rule's
guarantee is checked on several seeds: Krum keeps an honest update, the coordinate-wise rules
and Bulyan stay inside the honest per-coordinate range, the clipping rules move at most their
radius.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.server import (
    Aggregator,
    Bulyan,
    CenteredClipping,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = range(8)


def _scalars(*values: float) -> list[dict[str, Tensor]]:
    return [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]


def _value(agg: Aggregator, updates: list[dict[str, Tensor]], weights: list[float]) -> Tensor:
    return agg.aggregate(updates, weights, agg.init(updates[0])).value["w"]


def _honest(gen: torch.Generator, n: int) -> list[dict[str, Tensor]]:
    """``n`` updates N(0.3, 0.1²) per coordinate over two tensors."""
    return [
        {
            "layer.weight": 0.3 + 0.1 * torch.randn(4, 3, generator=gen),
            "layer.bias": 0.3 + 0.1 * torch.randn(3, generator=gen),
        }
        for _ in range(n)
    ]


def _extreme(gen: torch.Generator, like: dict[str, Tensor], f: int) -> list[dict[str, Tensor]]:
    """``f`` attackers at ±1e6, the sign drawn per coordinate."""
    out = []
    for _ in range(f):
        out.append(
            {
                k: 1e6 * (2 * torch.randint(0, 2, v.shape, generator=gen) - 1.0)
                for k, v in like.items()
            }
        )
    return out


def _far(gen: torch.Generator, like: dict[str, Tensor], f: int) -> list[dict[str, Tensor]]:
    """``f`` attackers at +100 (with a little noise so they are distinct)."""
    return [
        {k: 100.0 + 0.1 * torch.randn(v.shape, generator=gen) for k, v in like.items()}
        for _ in range(f)
    ]


def _shuffled(
    gen: torch.Generator, updates: list[dict[str, Tensor]]
) -> tuple[list[dict[str, Tensor]], list[float]]:
    perm = torch.randperm(len(updates), generator=gen).tolist()
    weights = (torch.randint(1, 50, (len(updates),), generator=gen).double()).tolist()
    return [updates[i] for i in perm], weights


def _inside_honest_range(out: dict[str, Tensor], honest: list[dict[str, Tensor]]) -> bool:
    for k, v in out.items():
        stacked = torch.stack([h[k] for h in honest])
        if not bool(((stacked.min(0).values <= v) & (v <= stacked.max(0).values)).all()):
            return False
    return True


# --- closed forms ----------------------------------------------------------------------------


def test_median_closed_form_odd_and_even_ignores_weights() -> None:
    assert _value(Median(), _scalars(1.0, 5.0, 2.0), [100.0, 1.0, 1.0]).item() == 2.0
    assert _value(Median(), _scalars(1.0, 5.0, 2.0, 10.0), [1.0, 1.0, 1.0, 100.0]).item() == 3.5


@pytest.mark.parametrize(
    ("beta", "expected"),
    [(0.1, 16.0 / 6.0), (0.2, 4.0), (0.4, 2.5)],  # int(β·6) = 0, 1, 2 cut from each side
)
def test_trimmed_mean_closed_form(beta: float, expected: float) -> None:
    ups = _scalars(-100.0, 1.0, 2.0, 3.0, 10.0, 100.0)
    out = _value(TrimmedMean(beta), ups, [1.0, 9.0, 1.0, 1.0, 1.0, 1.0])
    assert out.item() == pytest.approx(expected, abs=1e-12)


def test_krum_closed_form() -> None:
    # f = 1, n = 5: a score sums the 2 nearest squared distances: 0 → 1 + 9 = 10, 1 → 1 + 4 = 5,
    # 3 → 4 + 9 = 13, 7 → 16 + 36 = 52, 100 → 93² + 97²; the minimum is 1.
    out = Krum(f=1).aggregate(_scalars(0.0, 1.0, 3.0, 7.0, 100.0), [1.0] * 5, {})
    assert out.value["w"].item() == 1.0
    assert out.metrics == {"clients": 5.0, "selected": 1.0}


def test_krum_distance_is_global_over_all_tensors() -> None:
    # f = 0, n = 4, scores sum the 2 nearest squared distances. Over both tensors (points
    # (a, b)): 17.70, 10.47, 8.76, 15.99, so client 2. Tensor by tensor, "a" alone would pick
    # client 1 (11.6, 1.37, 3.46, 2.41) and "b" alone client 0 (0.97, 2.5, 1.85, 8.9).
    points = [(0.2, 1.6), (2.8, 0.7), (3.9, 2.0), (2.4, 3.9)]
    ups = [{"a": torch.tensor([a]), "b": torch.tensor([b])} for a, b in points]
    out = Krum(f=0).aggregate(ups, [1.0] * 4, {}).value
    assert tree.equal(out, ups[2])


def test_multikrum_closed_form_weights_the_kept_updates() -> None:
    # f = 1: scores 0 → 1 + 6.25, 1 → 1 + 2.25, 2.5 → 2.25 + 2.25, 4 → 2.25 + 9, 100 → huge.
    ups, w = _scalars(0.0, 1.0, 2.5, 4.0, 100.0), [1.0, 3.0, 1.0, 1.0, 1.0]
    assert _value(MultiKrum(f=1, m=2), ups, w).item() == pytest.approx((3 * 1.0 + 2.5) / 4)
    # m = n - f = 4 keeps 0, 1, 2.5, 4.
    assert _value(MultiKrum(f=1), ups, w).item() == pytest.approx((0 + 3 * 1.0 + 2.5 + 4) / 6)


def test_bulyan_closed_form() -> None:
    # f = 1: Krum picks 2.9, then (re-scored) 6.1, 1.0, 6.5, 0.3; the median of those is 2.9 and
    # the β = 3 values nearest to it are 2.9, 1.0, 0.3.
    ups = _scalars(0.3, 1.0, 2.9, 6.1, 6.5, 7.4, 30.0)
    out = Bulyan(f=1).aggregate(ups, [1.0] * 7, {})
    assert out.value["w"].item() == pytest.approx((2.9 + 1.0 + 0.3) / 3, abs=1e-12)
    assert out.metrics == {"clients": 7.0, "selected": 5.0}


def test_bulyan_without_attackers_is_the_unweighted_mean() -> None:
    # f = 0: θ = β = n, every update is selected and every value kept.
    assert _value(Bulyan(f=0), _scalars(1.0, 2.0, 3.0, 10.0), [5.0, 1.0, 1.0, 1.0]).item() == 4.0


def test_centered_clipping_closed_form_halves_the_distance_each_iteration() -> None:
    # Updates 0 and 10, τ = 1, from v = 0: the update at 10 is always clipped to +1, the one at 0
    # is within reach, so v ← v + (−v + 1) / 2 and v_t = 1 − 2^−t.
    agg = CenteredClipping(tau=1.0, iters=3)
    ups = _scalars(0.0, 10.0)
    first = agg.aggregate(ups, [1.0, 1.0], agg.init(ups[0]))
    assert first.value["w"].item() == 0.875
    assert first.state["v/w"].item() == 0.875
    second = agg.aggregate(ups, [1.0, 1.0], first.state)
    assert second.value["w"].item() == 1 - 2.0**-6
    assert second.metrics == {"clients": 2.0, "clipped": 1.0}


def test_norm_bound_closed_form() -> None:
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.5, 0.0])}]
    out = NormBound(c=1.0).aggregate(ups, [3.0, 1.0], {})
    # [3, 4] has norm 5 and becomes [0.6, 0.8]; [0.5, 0] is kept; weights 3 : 1.
    torch.testing.assert_close(out.value["w"], torch.tensor([0.575, 0.6]))
    assert out.metrics == {"clients": 2.0, "clipped": 1.0}


# --- guarantees under attack, several seeds ---------------------------------------------------


@pytest.mark.parametrize(("seed", "f"), list(itertools.product(SEEDS, [1, 2, 3])))
def test_krum_picks_an_honest_update(seed: int, f: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = _honest(gen, f + 3 + seed % 3)  # n = 2f + 3 + (0..2) > 2f + 2
    updates, weights = _shuffled(gen, honest + _far(gen, honest[0], f))
    out = Krum(f).aggregate(updates, weights, {}).value
    assert any(tree.equal(out, h) for h in honest)


@pytest.mark.parametrize(("seed", "f"), list(itertools.product(SEEDS, [1, 2])))
def test_multikrum_keeps_exactly_the_honest_updates(seed: int, f: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = _honest(gen, f + 3 + seed % 3)
    updates, weights = _shuffled(gen, honest + _far(gen, honest[0], f))
    out = MultiKrum(f).aggregate(updates, weights, {}).value  # keeps n - f = all honest ones
    honest_weights = [w for u, w in zip(updates, weights, strict=True) if u["layer.bias"][0] < 50]
    honest_order = [u for u in updates if u["layer.bias"][0] < 50]
    expected = tree.weighted_mean(honest_order, honest_weights)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_median_stays_in_the_honest_range(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 5 + seed  # f < n / 2
    f = (n - 1) // 2
    honest = _honest(gen, n - f)
    updates, weights = _shuffled(gen, honest + _extreme(gen, honest[0], f))
    assert _inside_honest_range(Median().aggregate(updates, weights, {}).value, honest)


@pytest.mark.parametrize(("seed", "beta"), list(itertools.product(SEEDS, [0.1, 0.25, 0.4])))
def test_trimmed_mean_stays_in_the_honest_range(seed: int, beta: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 6 + 2 * seed
    f = int(beta * n)  # the most attackers with f <= beta * n
    honest = _honest(gen, n - f)
    updates, weights = _shuffled(gen, honest + _extreme(gen, honest[0], f))
    assert _inside_honest_range(TrimmedMean(beta).aggregate(updates, weights, {}).value, honest)


@pytest.mark.parametrize(("seed", "f"), list(itertools.product(SEEDS, [1, 2])))
def test_bulyan_stays_in_the_honest_range(seed: int, f: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = _honest(gen, 3 * f + 3 + seed % 3)  # n = 4f + 3 + (0..2)
    updates, weights = _shuffled(gen, honest + _far(gen, honest[0], f))
    assert _inside_honest_range(Bulyan(f).aggregate(updates, weights, {}).value, honest)


@pytest.mark.parametrize("seed", SEEDS)
def test_centered_clipping_moves_at_most_tau_per_iteration(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = _honest(gen, 6)
    attackers = [tree.scale(u, 1e3) for u in _far(gen, honest[0], 2)]
    updates, weights = _shuffled(gen, [tree.cast(u, torch.float64) for u in honest + attackers])
    tau = 0.05 * (1 + seed)
    one_step = CenteredClipping(tau=tau, iters=1)
    state = {f"v/{k}": torch.randn(v.shape, generator=gen).double() for k, v in honest[0].items()}
    chained = dict(state)
    for _ in range(4):
        out = one_step.aggregate(updates, weights, chained)
        moved = tree.global_norm(tree.sub(out.value, {k[2:]: v for k, v in chained.items()}))
        assert moved <= tau * (1 + 1e-12)
        chained = out.state
    # Four iterations in one call are the same four steps.
    at_once = CenteredClipping(tau=tau, iters=4).aggregate(updates, weights, state)
    assert tree.equal(at_once.state, chained)


@pytest.mark.parametrize("seed", SEEDS)
def test_norm_bound_output_norm_is_at_most_c(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = _honest(gen, 5)
    updates, weights = _shuffled(gen, honest + _far(gen, honest[0], 2))
    c = 0.5 + seed
    out = NormBound(c).aggregate(updates, weights, {})
    assert tree.global_norm(out.value) <= c * (1 + 1e-6)
    assert out.metrics["clipped"] == sum(tree.global_norm(u) > c for u in updates)


def test_norm_bound_within_the_bound_is_the_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = _honest(gen, 4)
    weights = [1.0, 2.0, 3.0, 4.0]
    out = NormBound(c=1e3).aggregate(updates, weights, {}).value
    assert tree.equal(out, tree.weighted_mean(updates, weights))
