"""VectorizedRuntime: the cohort trains at once and matches the serial runtime within the
declared tolerance (``fedtransfer.client.fast.TOLERANCE``), for every ``LocalTraining``
option the vectorised path implements; what it declines is in ``test_declines.py``."""

from __future__ import annotations

import pytest
import torch
from tests.client.fast.cohorts import (
    PLAIN_SGD,
    ROUNDS,
    SIZES,
    Spy,
    Twin,
    assert_close_runs,
    assert_same_clients,
    decoded,
    make_conv_net,
    make_data,
    max_diff,
    recipe_with,
    run,
)

from fedtransfer import LocalTraining, tree
from fedtransfer.algorithms import hetlora
from fedtransfer.client import ErrorFeedback
from fedtransfer.client.fast import TOLERANCE
from fedtransfer.client.fast.features import no_feature_cache
from fedtransfer.client.fast.stacked import batches
from fedtransfer.client.train import minibatches
from fedtransfer.codecs import Float16
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import AutoRuntime, SerialRuntime, VectorizedRuntime
from fedtransfer.transfer import HeadOnly, LastK, Lora, PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")


# --- rounds: vectorised vs serial ---------------------------------------------------------------


def test_vectorized_runtime_matches_serial_within_the_declared_tolerance(spy: Spy) -> None:
    assert_close_runs(recipe_with(PLAIN_SGD), spy=spy)


def test_vectorized_clients_match_serial_clients_one_by_one() -> None:
    twin = assert_same_clients(recipe_with(PLAIN_SGD))
    steps = {s.client: s.metrics["steps"] for s, _ in twin.pairs}
    assert len(set(steps.values())) > 1  # clients of different sizes took different steps


def test_vectorized_matches_serial_with_momentum_and_weight_decay(spy: Spy) -> None:
    local = LocalTraining(lr=0.05, momentum=0.9, weight_decay=0.01, epochs=2, batch_size=8)
    assert_close_runs(recipe_with(local), spy=spy)
    assert_same_clients(recipe_with(local))


def test_vectorized_matches_serial_when_training_by_steps(spy: Spy) -> None:
    local = LocalTraining(lr=0.05, momentum=0.5, steps=7, batch_size=16)  # several epochs
    assert_close_runs(recipe_with(local), spy=spy)


def test_vectorized_matches_serial_with_adam(spy: Spy) -> None:
    local = LocalTraining(optimizer="adam", lr=0.01, weight_decay=0.001, epochs=2, batch_size=8)
    assert_close_runs(recipe_with(local), spy=spy)


def test_vectorized_matches_serial_with_mse_loss(spy: Spy) -> None:
    local = LocalTraining(lr=0.02, epochs=1, batch_size=8, loss="mse")
    data = make_data()
    regression = FederatedDataset(
        {
            c: TensorData(d.x, torch.nn.functional.one_hot(d.y, 3).float())
            for c, d in data.train.items()
        },
        data.test,
        3,
    )
    recipe = recipe_with(local)
    ref, _ = run(recipe, SerialRuntime(), data=regression)
    got, _ = run(recipe, VectorizedRuntime(), data=regression)
    assert max_diff(ref.params, got.params) <= TOLERANCE
    assert spy.batched == ROUNDS


def test_vectorized_matches_serial_with_last_k_blocks(spy: Spy) -> None:
    assert_close_runs(recipe_with(PLAIN_SGD, policy=LastK(k=2)), spy=spy)


def test_vectorized_matches_serial_with_head_only_without_the_feature_cache(spy: Spy) -> None:
    with no_feature_cache():
        assert_close_runs(recipe_with(PLAIN_SGD, policy=HeadOnly()), spy=spy)


def test_vectorized_matches_serial_with_local_keys(spy: Spy) -> None:
    recipe = recipe_with(PLAIN_SGD, policy=PersonalHead())  # the head trains and stays local
    assert_close_runs(recipe, spy=spy)
    twin = assert_same_clients(recipe)
    assert all(s.local for s, _ in twin.pairs)


LORA_SGD = LocalTraining(lr=0.02, momentum=0.5, weight_decay=0.01, epochs=2, batch_size=8)


@pytest.mark.parametrize(
    ("policy", "ranks"),
    [
        (Lora(rank=2), None),
        (Lora(rank=4), (1, 2, 4)),  # clients of different ranks (zero slots stay zero)
        (Lora(rank=4, ffa=True, train=("head",)), (1, 4)),  # per-client frozen keys
    ],
    ids=["lora", "lora-ranks", "ffa-lora-ranks"],
)
def test_vectorized_matches_serial_with_lora(
    policy: Lora, ranks: tuple[int, ...] | None, spy: Spy
) -> None:
    recipe = recipe_with(LORA_SGD, policy=policy)
    assert_close_runs(recipe if ranks is None else hetlora(recipe, ranks=ranks), spy=spy)


def within_half_step(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    """At most one float16 rounding step of ``scale`` apart (a 1e-8 difference in training may
    round either way)."""
    return bool(((a - b).abs() <= scale.abs() * 2.0**-10 + 1e-7).all())


def test_vectorized_matches_serial_with_float16_uplink_and_error_feedback() -> None:
    recipe = recipe_with(PLAIN_SGD, uplink=Float16(), client_transforms=(ErrorFeedback(),))
    twin = Twin()  # both paths see the same state every round: compare clients one by one
    run(recipe, twin)
    for s, v in twin.pairs:
        assert (len(s.uplink), s.metrics["steps"]) == (len(v.uplink), v.metrics["steps"])
        a, b = decoded(recipe, s), decoded(recipe, v)
        assert all(within_half_step(a[k], b[k], a[k].abs().maximum(b[k].abs())) for k in a)
        assert s.memory.keys() == v.memory.keys() == {f"transform/0/{k}" for k in a}
        for k in a:  # the error-feedback residuals: what float16 dropped of the update
            residuals = s.memory[f"transform/0/{k}"], v.memory[f"transform/0/{k}"]
            assert within_half_step(*residuals, a[k].abs().maximum(b[k].abs()))


def test_vectorized_matches_serial_in_chunks(spy: Spy) -> None:
    recipe = recipe_with(PLAIN_SGD)
    ref, _ = run(recipe, SerialRuntime())
    spy.serial = 0
    got, _ = run(recipe, VectorizedRuntime(chunk=4))  # 6 clients: a chunk of 4 and one of 2
    assert max_diff(ref.params, got.params) <= TOLERANCE
    assert (spy.batched, spy.serial) == (2 * ROUNDS, 0)


def test_vectorized_matches_serial_with_a_client_without_data(spy: Spy) -> None:
    data = make_data((*SIZES, 0))
    recipe = recipe_with(PLAIN_SGD)
    ref, ref_reports = run(recipe, SerialRuntime(), data=data)
    got, reports = run(recipe, VectorizedRuntime(), data=data)
    assert max_diff(ref.params, got.params) <= TOLERANCE
    assert [r.rejected for r in ref_reports] == [r.rejected for r in reports]
    assert reports[0].rejected  # the empty client's update carries no weight
    assert spy.batched == ROUNDS


def test_auto_runtime_vectorizes_small_models_only(spy: Spy) -> None:
    recipe = recipe_with(PLAIN_SGD)
    ref, _ = run(recipe, SerialRuntime(), rounds=2)
    spy.serial = 0
    small, _ = run(recipe, AutoRuntime(), rounds=2)
    assert max_diff(ref.params, small.params) <= TOLERANCE
    assert (spy.batched, spy.serial) == (2, 0)
    large, _ = run(recipe, AutoRuntime(max_params=100), rounds=2)  # the MLP has ~1.3k
    assert tree.equal(ref.params, large.params)
    assert (spy.declined, spy.serial) == (2, 2 * len(SIZES))


def test_vectorized_matches_serial_on_a_conv_net(spy: Spy) -> None:
    assert_close_runs(recipe_with(PLAIN_SGD), make_conv_net, spy=spy)


def test_vectorized_runtime_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run(recipe_with(PLAIN_SGD), VectorizedRuntime(), rounds=1)
    assert torch.equal(torch.rand(3), expected)


def test_vectorized_results_are_reproducible() -> None:
    recipe = recipe_with(PLAIN_SGD)
    first, _ = run(recipe, VectorizedRuntime(), rounds=2)
    second, _ = run(recipe, VectorizedRuntime(), rounds=2)
    assert tree.equal(first.params, second.params)


@pytest.mark.parametrize(
    ("n", "spec"),
    [
        (40, LocalTraining(epochs=2, batch_size=8)),  # full minibatches: one tensor
        (17, LocalTraining(epochs=2, batch_size=8)),  # a short last minibatch per epoch
        (5, LocalTraining(steps=7, batch_size=8)),  # steps over several epochs of one batch
        (33, LocalTraining(steps=3, batch_size=16)),  # steps within the first epoch
        (0, LocalTraining()),  # no data: no step
    ],
)
def test_stacked_minibatches_are_the_local_loops(n: int, spec: LocalTraining) -> None:
    """One definition of the minibatches: the stacked loop's are ``local_train``'s."""
    expected = list(minibatches(n, spec, torch.Generator().manual_seed(7)))
    drawn = batches(n, spec, torch.Generator().manual_seed(7))
    got = list(drawn.unbind(0)) if isinstance(drawn, torch.Tensor) else drawn
    assert len(got) == len(expected) == (spec.num_steps(n) if n else 0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
