"""VectorizedRuntime: the cohort trains at once and matches the serial runtime within 1e-5;
unsupported cohorts fall back to exactly the serial results."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_model
from torch import nn

import fedtransfer.client.update as update_module
import fedtransfer.client.vectorized as vectorized_module
from fedtransfer import (
    ConfigError,
    LocalTraining,
    Recipe,
    Reply,
    Runtime,
    ServerState,
    run_round,
    tree,
)
from fedtransfer.client import ClientTask, ClientUpdate, ErrorFeedback, Prox
from fedtransfer.client.features import no_feature_cache
from fedtransfer.codecs import Float16, Payload
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import AutoRuntime, SerialRuntime, VectorizedRuntime
from fedtransfer.runtime.vectorized import batched_map
from fedtransfer.server import AllClients
from fedtransfer.transfer import HeadOnly, LastK, Lora, PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
ROUNDS = 5
SIZES = (5, 17, 40, 33, 8, 64)  # different sizes: different step counts and short last batches


class MLP(nn.Module):
    """8x8 inputs ▸ two hidden layers ▸ a 3-class head; no dropout, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh()
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.body.append(nn.Dropout(0.3))


class NoisyMLP(MLP):
    """Draws from the global generator in its forward, with no Dropout module to see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 0.01 * torch.randn_like(out) if self.training else out


class CountingMLP(MLP):
    """Updates a buffer of its own in train mode (as BatchNorm does, without being one)."""

    calls: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls.add_(1)
        return super().forward(x)


def make_counting_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return CountingMLP()


class ConvNet(nn.Module):
    """A small convolutional net on 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(x.flatten(-3))


def make_conv_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return ConvNet()


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return MLP()


def make_dropout_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return DropoutMLP()


def make_noisy_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return NoisyMLP()


def make_data(sizes: Sequence[int] = SIZES) -> FederatedDataset:
    gen = torch.Generator().manual_seed(0)
    train, test = {}, {}
    for i, n in enumerate(sizes):
        x = torch.randn(n + 4, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (n + 4,), generator=gen)
        x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()
        train[f"c{i}"] = TensorData(x[:n], y[:n])
        test[f"c{i}"] = TensorData(x[n:], y[n:])
    return FederatedDataset(train, test, 3)


@dataclass
class Twin:
    """A runtime that runs every cohort both ways: returns the serial results and keeps the
    vectorised ones beside them (``fn.batch`` must accept every cohort)."""

    pairs: list[tuple[Reply, Reply]] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        serial = [fn(t) for t in tasks]
        batched = fn.batch(tasks)  # type: ignore[attr-defined]
        assert batched is not None, "the vectorised path declined this cohort"
        self.pairs += list(zip(serial, batched, strict=True))
        return serial


@dataclass
class Spy:
    """Counts vectorised calls that trained (returned results) and that declined (None), and
    the clients run one by one through ``client_update``."""

    batched: int = 0
    declined: int = 0
    serial: int = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    seen = Spy()
    vectorized_update = vectorized_module.vectorized_update
    client_update = update_module.client_update

    def counting_batch(*args: Any, **kwargs: Any) -> list[Reply] | None:
        out = vectorized_update(*args, **kwargs)
        if out is None:
            seen.declined += 1
        else:
            seen.batched += 1
        return out

    def counting_client(*args: Any, **kwargs: Any) -> Reply:
        seen.serial += 1
        return client_update(*args, **kwargs)

    monkeypatch.setattr(vectorized_module, "vectorized_update", counting_batch)
    monkeypatch.setattr(update_module, "client_update", counting_client)
    yield seen


def run(
    recipe: Recipe,
    runtime: Any,  # a Runtime, or one of the recording runtimes here
    model_fn: Callable[[], nn.Module] = make_mlp,
    data: FederatedDataset | None = None,
    rounds: int = ROUNDS,
) -> tuple[ServerState, list[Any]]:
    data = data or make_data()
    state = ServerState.initial(recipe, model_fn(), seed=3)
    reports = []
    for _ in range(rounds):
        state, report = run_round(recipe, state, data, runtime, model_fn=model_fn)
        reports.append(report)
    return state, reports


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def assert_close_runs(
    recipe: Recipe, model_fn: Callable[[], nn.Module] = make_mlp, spy: Spy | None = None
) -> None:
    """Serial and vectorised runs of ``recipe``: same weights (1e-5), bytes, steps, losses."""
    ref, ref_reports = run(recipe, SerialRuntime(), model_fn)
    if spy is not None:
        spy.serial = 0
    got, reports = run(recipe, VectorizedRuntime(), model_fn)
    assert not tree.equal(ref.params, ServerState.initial(recipe, model_fn(), seed=3).params)
    assert max_diff(ref.params, got.params) <= TOL
    assert ref.holdings.local.keys() == got.holdings.local.keys()
    for c in ref.holdings.local:
        assert max_diff(ref.holdings.local[c], got.holdings.local[c]) <= TOL
    for a, b in zip(ref_reports, reports, strict=True):
        assert (a.bytes_up, a.bytes_down, a.accepted, a.rejected) == (
            b.bytes_up,
            b.bytes_down,
            b.accepted,
            b.rejected,
        )
        assert a.metrics["client/steps"] == b.metrics["client/steps"]
        assert a.metrics["client/train_loss"] == pytest.approx(
            b.metrics["client/train_loss"], abs=TOL
        )
    if spy is not None:
        assert spy.batched == ROUNDS and spy.declined == 0 and spy.serial == 0


def decoded(recipe: Recipe, res: Reply) -> dict[str, torch.Tensor]:
    return recipe.uplink.decode(Payload.from_bytes(res.uplink))


def assert_same_clients(recipe: Recipe, model_fn: Callable[[], nn.Module] = make_mlp) -> Twin:
    """Every client result of every round, vectorised vs serial: within 1e-5 and equal sizes."""
    twin = Twin()
    run(recipe, twin, model_fn)
    assert len(twin.pairs) == ROUNDS * len(SIZES)
    for s, v in twin.pairs:
        assert (s.client, s.num_examples, len(s.uplink), s.error) == (
            v.client,
            v.num_examples,
            len(v.uplink),
            v.error,
        )
        assert max_diff(decoded(recipe, s), decoded(recipe, v)) <= TOL
        assert max_diff(s.local, v.local) <= TOL
        assert max_diff(s.memory, v.memory) <= TOL
        assert s.metrics.keys() == v.metrics.keys()
        assert (s.metrics["steps"], s.metrics["examples"]) == (
            v.metrics["steps"],
            v.metrics["examples"],
        )
        assert s.metrics["loss"] == pytest.approx(v.metrics["loss"], abs=TOL)
    return twin


def recipe_with(local: LocalTraining, **kwargs: Any) -> Recipe:
    return Recipe(local=local, sampler=AllClients(), **kwargs)


PLAIN_SGD = LocalTraining(lr=0.1, epochs=2, batch_size=8)


# --- rounds: vectorised vs serial ---------------------------------------------------------------


def test_vectorized_runtime_matches_serial_within_1e5(spy: Spy) -> None:
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
    assert max_diff(ref.params, got.params) <= TOL
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
    "policy",
    [
        Lora(rank=2),
        Lora(rank=4, ranks=(1, 2, 4)),  # clients of different ranks (zero slots stay zero)
        Lora(rank=4, ranks=(1, 4), ffa=True, train=("head",)),  # per-client frozen keys
    ],
    ids=["lora", "lora-ranks", "ffa-lora-ranks"],
)
def test_vectorized_matches_serial_with_lora(policy: Lora, spy: Spy) -> None:
    assert_close_runs(recipe_with(LORA_SGD, policy=policy), spy=spy)


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
    assert max_diff(ref.params, got.params) <= TOL
    assert (spy.batched, spy.serial) == (2 * ROUNDS, 0)


def test_vectorized_matches_serial_with_a_client_without_data(spy: Spy) -> None:
    data = make_data((*SIZES, 0))
    recipe = recipe_with(PLAIN_SGD)
    ref, ref_reports = run(recipe, SerialRuntime(), data=data)
    got, reports = run(recipe, VectorizedRuntime(), data=data)
    assert max_diff(ref.params, got.params) <= TOL
    assert [r.rejected for r in ref_reports] == [r.rejected for r in reports]
    assert reports[0].rejected  # the empty client's update carries no weight
    assert spy.batched == ROUNDS


# --- fallbacks: exactly the serial results ------------------------------------------------------


def assert_falls_back(recipe: Recipe, model_fn: Callable[[], nn.Module], spy: Spy) -> None:
    ref, _ = run(recipe, SerialRuntime(), model_fn, rounds=2)
    spy.serial = 0
    got, _ = run(recipe, VectorizedRuntime(), model_fn, rounds=2)
    assert tree.equal(ref.params, got.params)
    assert (spy.batched, spy.declined, spy.serial) == (0, 2, 2 * len(SIZES))


def test_vectorized_falls_back_for_a_dropout_model(spy: Spy) -> None:
    assert_falls_back(recipe_with(PLAIN_SGD), make_dropout_mlp, spy)


def test_vectorized_falls_back_for_a_model_drawing_random_numbers(spy: Spy) -> None:
    assert_falls_back(recipe_with(PLAIN_SGD), make_noisy_mlp, spy)


def test_vectorized_falls_back_for_a_model_updating_a_buffer(spy: Spy) -> None:
    assert_falls_back(recipe_with(PLAIN_SGD), make_counting_mlp, spy)


def test_vectorized_falls_back_for_batchnorm_in_train_mode(spy: Spy) -> None:
    local = LocalTraining(lr=0.1, epochs=2, batch_size=10)  # no minibatch of one example
    assert_falls_back(recipe_with(local), make_tiny_model, spy)


def test_vectorized_falls_back_for_the_prox_objective(spy: Spy) -> None:
    assert_falls_back(recipe_with(PLAIN_SGD, objective=Prox(mu=0.1)), make_mlp, spy)


def test_vectorized_falls_back_when_the_feature_cache_serves_the_head(spy: Spy) -> None:
    assert_falls_back(recipe_with(PLAIN_SGD, policy=HeadOnly()), make_mlp, spy)


@dataclass(frozen=True)
class FailingTransform:
    """A client transform that fails (after training, while the update is prepared)."""

    def apply(
        self, update: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, uplink: Any
    ) -> Any:
        raise ValueError("transform failed")


def test_vectorized_errors_are_the_serial_errors_naming_client_and_round() -> None:
    recipe = recipe_with(PLAIN_SGD, client_transforms=(FailingTransform(),))
    with pytest.raises(RuntimeError, match=r"client c0, round 1 failed: ValueError"):
        run(recipe, SerialRuntime(), rounds=1)
    with pytest.raises(RuntimeError, match=r"client c0, round 1 failed: ValueError"):
        run(recipe, VectorizedRuntime(), rounds=1)


def test_vectorized_update_declines_a_single_task_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = recipe_with(PLAIN_SGD)
    tasks: list[ClientTask] = []

    class Keep:
        def map(self, fn: Callable[[Any], Reply], ts: Sequence[Any]) -> list[Reply]:
            tasks.extend(ts)
            return [fn(t) for t in ts]

    run(recipe, Keep(), rounds=1)
    fn = ClientUpdate(recipe, make_mlp)
    with caplog.at_level("DEBUG", logger="fedtransfer.client.vectorized"):
        assert fn.batch(tasks[:1]) is None
        assert fn.batch(tasks, max_params=100) is None
    assert "a single task" in caplog.text
    assert "> max_params=100" in caplog.text
    assert fn.batch(tasks) is not None


def test_auto_runtime_vectorizes_small_models_only(spy: Spy) -> None:
    recipe = recipe_with(PLAIN_SGD)
    ref, _ = run(recipe, SerialRuntime(), rounds=2)
    spy.serial = 0
    small, _ = run(recipe, AutoRuntime(), rounds=2)
    assert max_diff(ref.params, small.params) <= TOL
    assert (spy.batched, spy.serial) == (2, 0)
    large, _ = run(recipe, AutoRuntime(max_params=100), rounds=2)  # the MLP has ~1.3k
    assert tree.equal(ref.params, large.params)
    assert (spy.declined, spy.serial) == (2, 2 * len(SIZES))


def test_vectorized_matches_serial_on_a_conv_net(spy: Spy) -> None:
    assert_close_runs(recipe_with(PLAIN_SGD), make_conv_net, spy=spy)


def test_auto_runtime_runs_training_convolutions_serially(spy: Spy) -> None:
    recipe = recipe_with(PLAIN_SGD)
    ref, _ = run(recipe, SerialRuntime(), make_conv_net, rounds=2)
    spy.serial = 0
    got, _ = run(recipe, AutoRuntime(), make_conv_net, rounds=2)
    assert tree.equal(ref.params, got.params)
    assert (spy.batched, spy.declined, spy.serial) == (0, 2, 2 * len(SIZES))
    frozen_convolution = recipe_with(PLAIN_SGD, policy=HeadOnly())  # only the head trains
    with no_feature_cache():
        ref, _ = run(frozen_convolution, SerialRuntime(), make_conv_net, rounds=2)
        got, _ = run(frozen_convolution, AutoRuntime(), make_conv_net, rounds=2)
    assert max_diff(ref.params, got.params) <= TOL
    assert spy.batched == 2


# --- the runtime itself: FL-free batching -------------------------------------------------------


@dataclass
class Batcher:
    """A function with a ``batch`` method that records the batches it is given."""

    accept: bool = True
    seen: list[list[int]] = field(default_factory=list)
    hints: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, x: int) -> int:
        return x * 10

    def batch(self, xs: Sequence[int], **hints: Any) -> list[int] | None:
        self.seen.append(list(xs))
        self.hints.append(hints)
        return [x * 10 for x in xs] if self.accept else None


def test_vectorized_runtime_is_a_runtime_and_its_repr_is_its_config() -> None:
    assert isinstance(VectorizedRuntime(), Runtime)
    assert repr(VectorizedRuntime(chunk=8)) == "VectorizedRuntime(chunk=8, min_tasks=2)"


def test_vectorized_runtime_batches_in_chunks_in_task_order() -> None:
    fn = Batcher()
    assert VectorizedRuntime(chunk=2).map(fn, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert fn.seen == [[1, 2], [3, 4]]  # the last chunk of one is under min_tasks: one by one
    assert fn.hints == [{}, {}]


def test_vectorized_runtime_runs_tasks_one_by_one_when_batch_declines() -> None:
    fn = Batcher(accept=False)
    assert VectorizedRuntime().map(fn, [1, 2, 3]) == [10, 20, 30]
    assert fn.seen == [[1, 2, 3]]


def test_vectorized_runtime_without_batch_or_with_too_few_tasks_maps_one_by_one() -> None:
    assert VectorizedRuntime().map(lambda x: x + 1, [1, 2]) == [2, 3]
    fn = Batcher()
    assert VectorizedRuntime(min_tasks=4).map(fn, [1, 2, 3]) == [10, 20, 30]
    assert fn.seen == []
    assert VectorizedRuntime().map(fn, []) == []


def test_auto_runtime_passes_its_limits_to_batch() -> None:
    fn = Batcher()
    assert AutoRuntime(max_params=123).map(fn, [1, 2]) == [10, 20]
    assert fn.hints == [{"max_params": 123, "convolutions": False}]


def test_batched_map_rejects_a_batch_of_the_wrong_length() -> None:
    class Short(Batcher):
        def batch(self, xs: Sequence[int], **hints: Any) -> list[int] | None:
            return [1]

    with pytest.raises(RuntimeError, match="returned 1 results for 3 tasks"):
        batched_map(Short(), [1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk": 0}, "chunk must be an integer >= 1 or None, got 0"),
        ({"chunk": True}, "chunk must be"),
        ({"min_tasks": 0}, "min_tasks must be an integer >= 1, got 0"),
    ],
)
def test_vectorized_runtime_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        VectorizedRuntime(**kwargs)
    with pytest.raises(ConfigError, match=match):
        AutoRuntime(**kwargs)


def test_auto_runtime_rejects_a_non_integer_size_limit() -> None:
    with pytest.raises(ConfigError, match=r"max_params must be an integer, got 1\.5"):
        AutoRuntime(max_params=1.5)  # type: ignore[arg-type]


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
