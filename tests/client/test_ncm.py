"""FedNCM (``NearestClassMean``) through ``run_round``: one round sets the head to the
nearest-class-mean classifier of the cohort's pooled frozen features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from tests.conftest import RecordingRuntime
from torch import Tensor, nn

from fedtransfer import CompatibilityError, Recipe, ServerState, run_round, tree
from fedtransfer.algorithms import fedncm
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.codecs import Float32, TopK
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.rounds.schedule import Schedule, begin_round
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import ServerAdam, ServerPipeline, ServerSGD, Uniform
from fedtransfer.transfer import Full, HeadOnly

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES, IN_DIM, FEATURE_DIM = 4, 6, 5
HEAD = ("head.weight", "head.bias")
COHORT = 3


class FeatureNet(nn.Module):
    """A frozen feature extractor (Linear ▸ Tanh) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(IN_DIM, FEATURE_DIM), nn.Tanh())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FeatureNet()


def _population(classes: Sequence[int], *, spread: float = 0.15) -> FederatedDataset:
    """Five clients of tight clusters around well-separated class centres; each client holds a
    different mix of ``classes`` and a different number of examples."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(NUM_CLASSES, IN_DIM, generator=gen) * 2.0
    train, test = {}, {}
    for i in range(5):
        held = [c for j, c in enumerate(classes) if (i + j) % 3 != 0] or list(classes)
        n = 12 + 5 * i
        y = torch.tensor(held)[torch.randint(0, len(held), (n,), generator=gen)]
        x = centres[y] + spread * torch.randn(n, IN_DIM, generator=gen)
        yt = torch.tensor(classes)[torch.randint(0, len(classes), (20,), generator=gen)]
        xt = centres[yt] + spread * torch.randn(20, IN_DIM, generator=gen)
        train[f"c{i}"], test[f"c{i}"] = TensorData(x, y), TensorData(xt, yt)
    return FederatedDataset(train, test, NUM_CLASSES)


def _recipe(objective: NearestClassMean | None = None) -> Recipe:
    return Recipe(
        policy=HeadOnly(), objective=objective or NearestClassMean(), sampler=Uniform(COHORT)
    )


def _ncm_round(
    data: FederatedDataset, objective: NearestClassMean | None = None
) -> tuple[ServerState, ServerState, Any, RecordingRuntime]:
    recipe = _recipe(objective)
    recipe.validate(make_model(), population=data.clients)
    state = ServerState.initial(recipe, make_model(), seed=0)
    runtime = RecordingRuntime()
    new, report = run_round(recipe, state, data, runtime, model_fn=make_model)
    assert len(report.accepted) == COHORT and not report.rejected
    return state, new, report, runtime


def _features(weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """The head's input for ``x``, captured with a forward hook, as float64."""
    model = make_model()
    model.load_state_dict(weights)
    model.eval()
    seen: list[Tensor] = []
    handle = model.head.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].double()


def _pooled_means(
    state: ServerState, data: FederatedDataset, cohort: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Class means of the cohort's pooled training features, and which classes appear."""
    pooled = TensorData.concat([data.train[c] for c in cohort])
    feats = _features(state.weights_for(), pooled.x)
    seen = torch.bincount(pooled.y, minlength=NUM_CLASSES) > 0
    means = torch.zeros(NUM_CLASSES, FEATURE_DIM, dtype=torch.float64)
    for c in range(NUM_CLASSES):
        if seen[c]:
            means[c] = feats[pooled.y == c].mean(0)
    return means, seen


def test_ncm_round_sets_head_to_scaled_pooled_class_means() -> None:
    data = _population(range(NUM_CLASSES))
    old, new, report, _ = _ncm_round(data)
    means, seen = _pooled_means(old, data, report.cohort)
    assert bool(seen.all())
    # the cohort is a strict subset and client mixes differ: a per-client mean of means or an
    # unpooled/population mean would not match
    assert len(report.cohort) < len(data.clients)
    s = 1.0 / float(means.norm(dim=1).mean())
    torch.testing.assert_close(new.params["head.weight"].double(), s * means, rtol=0, atol=1e-5)
    expected_b = -0.5 * s * (means**2).sum(1)
    torch.testing.assert_close(new.params["head.bias"].double(), expected_b, rtol=0, atol=1e-5)


def test_ncm_round_keeps_head_rows_of_classes_no_client_holds() -> None:
    data = _population((0, 1, 2))  # class 3 is absent everywhere
    old, new, report, _ = _ncm_round(data)
    means, seen = _pooled_means(old, data, report.cohort)
    assert seen.tolist() == [True, True, True, False]
    assert torch.equal(new.params["head.weight"][3], old.params["head.weight"][3])
    assert torch.equal(new.params["head.bias"][3], old.params["head.bias"][3])
    # the scale is over the classes seen only (mutation: averaging a zero mean in)
    s = 1.0 / float(means[:3].norm(dim=1).mean())
    torch.testing.assert_close(
        new.params["head.weight"][:3].double(), s * means[:3], rtol=0, atol=1e-5
    )


def test_ncm_round_leaves_the_feature_extractor_unchanged() -> None:
    old, new, _, _ = _ncm_round(_population(range(NUM_CLASSES)))
    assert list(new.params) == list(HEAD)
    body = [k for k in old.distribution.start if k not in HEAD]
    assert tree.equal(
        tree.select(new.weights_for(), body), tree.select(old.distribution.start, body)
    )
    assert not tree.equal(new.params, old.params)


def test_ncm_round_model_classifies_like_a_direct_nearest_class_mean() -> None:
    data = _population(range(NUM_CLASSES))
    old, new, report, _ = _ncm_round(data)
    means, _ = _pooled_means(old, data, report.cohort)
    test = data.pooled_test()
    model = make_model()
    model.load_state_dict(new.weights_for())
    with torch.no_grad():
        predicted = model(test.x).argmax(1)
    nearest = torch.cdist(_features(old.weights_for(), test.x), means).argmin(1)
    assert torch.equal(predicted, nearest)
    accuracy = float((predicted == test.y).float().mean())
    assert accuracy >= 0.95
    with torch.no_grad():  # the random head it replaced does not classify
        before = float((make_model()(test.x).argmax(1) == test.y).float().mean())
    assert before < 0.6


def test_ncm_batch_size_does_not_change_the_head() -> None:
    data = _population(range(NUM_CLASSES))
    _, whole, _, _ = _ncm_round(data)
    _, batched, _, _ = _ncm_round(data, NearestClassMean(batch_size=5))
    for k in HEAD:
        torch.testing.assert_close(batched.params[k], whole.params[k], rtol=0, atol=1e-6)


def test_ncm_round_counts_the_extras_in_bytes_up() -> None:
    old, new, report, runtime = _ncm_round(_population(range(NUM_CLASSES)))
    assert report.bytes_up == sum(len(r.uplink) + len(r.extras) for r in runtime.results)
    update = len(Float32().encode(tree.zeros_like(old.params)).to_bytes())
    extras = {
        "sum": torch.zeros(NUM_CLASSES, FEATURE_DIM),
        "count": torch.zeros(NUM_CLASSES),
    }
    assert all(len(r.extras) == len(Float32().encode(extras).to_bytes()) for r in runtime.results)
    assert report.bytes_up == COHORT * (update + len(Float32().encode(extras).to_bytes()))
    assert new.ledger["up"] == report.bytes_up


def test_recipe_validate_rejects_ncm_with_a_policy_sharing_more_than_the_head() -> None:
    recipe = Recipe(policy=Full(), objective=NearestClassMean())
    with pytest.raises(CompatibilityError, match="NearestClassMean: the shared keys"):
        recipe.validate(make_model())


def test_recipe_validate_rejects_ncm_with_a_server_optimiser_that_changes_the_step() -> None:
    recipe = Recipe(
        policy=HeadOnly(),
        objective=NearestClassMean(),
        pipeline=ServerPipeline(post=(ServerAdam(lr=0.01),)),
    )
    with pytest.raises(CompatibilityError, match=r"ServerSGD\(\)"):
        recipe.validate(make_model())


def test_recipe_validate_accepts_ncm_with_plain_server_sgd() -> None:
    recipe = Recipe(
        policy=HeadOnly(),
        objective=NearestClassMean(),
        pipeline=ServerPipeline(post=(ServerSGD(),)),
    )
    assert recipe.validate(make_model()).shared == HEAD


def test_recipe_validate_names_the_stage_where_ncm_meets_a_full_policy() -> None:
    ncm = Recipe(policy=HeadOnly(), objective=NearestClassMean())
    ok = Schedule(((1, ncm), (None, Recipe(policy=Full()))))
    ok.validate(make_model())
    bad = Schedule(((1, Recipe(policy=HeadOnly())), (None, replace(ncm, policy=Full()))))
    with pytest.raises(CompatibilityError, match=r"Schedule\.stages\[1\]: NearestClassMean"):
        bad.validate(make_model())


def test_ncm_fedncm_schedule_fine_tunes_from_the_ncm_head() -> None:
    data = _population(range(NUM_CLASSES))
    recipe = fedncm(Recipe(sampler=Uniform(COHORT)))
    recipe.validate(make_model(), population=data.clients)
    state = recipe.start(make_model(), seed=0)
    ncm, _ = run_round(recipe, state, data, SerialRuntime(), model_fn=make_model)
    _, old, _, _ = _ncm_round(data)  # the same round without a schedule
    assert tree.equal(ncm.params, old.params)
    _, ft = begin_round(recipe, ncm, model_fn=recipe.prepared(make_model))
    assert ft.distribution.stage == 1 and set(ft.params) == set(make_model().state_dict())
    assert tree.equal(tree.select(ft.params, HEAD), ncm.params)


def test_ncm_with_a_sparse_uplink_is_refused_or_sets_the_head_exactly() -> None:
    """The class sums and counts travel through the uplink codec; ``TopK`` keeps a few entries
    of each, so classes vanish from the counts. Either validation refuses the combination or
    the round still yields the pooled nearest-class-mean head."""
    data = _population(range(NUM_CLASSES))
    recipe = replace(_recipe(), uplink=TopK(0.1))
    try:
        recipe.validate(make_model(), population=data.clients)
    except CompatibilityError:
        return
    state = ServerState.initial(recipe, make_model(), seed=0)
    new, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_model)
    means, _ = _pooled_means(state, data, report.cohort)
    s = 1.0 / float(means.norm(dim=1).mean())
    torch.testing.assert_close(new.params["head.weight"].double(), s * means, rtol=0, atol=1e-5)


def test_ncm_server_apply_without_any_counted_class_leaves_the_head() -> None:
    """Extras whose counts are all zero (no examples) change nothing and report no NaN."""
    import math

    from fedtransfer.client.ncm import NearestClassMean

    params = {"head.weight": torch.randn(3, 4), "head.bias": torch.randn(3)}
    step = {k: torch.zeros_like(v) for k, v in params.items()}
    extras = [{"sum": torch.zeros(3, 4), "count": torch.zeros(3)}]
    out = NearestClassMean().server_apply(
        step,
        updates=[step],
        extras=extras,
        weights=[1.0],
        state={},
        population_size=1,
        params=params,
    )
    assert tree.equal(out.value, step)
    assert all(math.isfinite(v) for v in out.metrics.values())
