"""LoRA adapters and the ``Lora`` policy: wrappers, merging, determinism, plans and contracts."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fedtransfer import TransferPolicy, tree
from fedtransfer.errors import PlanError
from fedtransfer.models import CNN
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.lora_modules import (
    LoRAConv2d,
    LoRALinear,
    LoRAModule,
    merge,
    merged_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class Mixed(nn.Module):
    """Convolutions with stride, padding, dilation, a rectangular kernel, reflect padding and
    no bias, then two linear layers (one without bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 4, (3, 2), padding=(2, 1), dilation=2)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc1 = nn.Linear(64, 5, bias=False)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _mixed() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Mixed()


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _cnn() -> nn.Module:
    return CNN().init(0)


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRAModule):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.3)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.3)


def _x() -> Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _wrappers(model: nn.Module) -> dict[str, LoRAModule]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRAModule)}


# --- wrappers and merging ------------------------------------------------------------------------


def test_lora_merge_computes_the_adapted_output() -> None:
    model = Lora(rank=3, alpha=6.0).prepare(_mixed())
    _randomize_adapters(model)
    assert set(_wrappers(model)) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    adapted = model(_x())
    assert not torch.allclose(adapted, _mixed()(_x()), atol=1e-3)
    torch.testing.assert_close(merge(model)(_x()), adapted, rtol=0, atol=1e-5)


def test_lora_merge_restores_the_original_keys_and_types() -> None:
    model = Lora(rank=3).prepare(_mixed())
    _randomize_adapters(model)
    merged = merge(model)
    assert list(merged.state_dict()) == list(_mixed().state_dict())
    assert not _wrappers(merged)
    assert type(merged.conv2) is nn.Conv2d and type(merged.fc1) is nn.Linear


def test_lora_merge_folds_delta_weight_into_the_base_weight() -> None:
    model = Lora(rank=2).prepare(_mixed())
    _randomize_adapters(model)
    merged = merge(model)
    for path, wrapper in _wrappers(model).items():
        expected = wrapper.base.weight + wrapper.delta_weight()
        assert torch.equal(merged.get_submodule(path).weight, expected.detach()), path


def test_lora_merge_leaves_the_prepared_model_unchanged() -> None:
    model = Lora(rank=2).prepare(_mixed())
    _randomize_adapters(model)
    before = tree.clone(model.state_dict())
    merge(model)
    assert tree.equal(model.state_dict(), before)
    assert set(_wrappers(model)) == {"conv1", "conv2", "conv3", "fc1", "fc2"}


def test_lora_merged_state_dict_equals_the_merged_model_state_dict() -> None:
    model = Lora(rank=3, alpha=5.0).prepare(_mixed())
    _randomize_adapters(model)
    got = merged_state_dict(model.state_dict(), alpha=5.0, rank=3)
    want = merge(model).state_dict()
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_lora_conv_delta_weight_has_the_base_weight_shape() -> None:
    model = Lora(rank=2).prepare(_mixed())
    conv2 = model.get_submodule("conv2")
    assert isinstance(conv2, LoRAConv2d)
    assert conv2.lora_A.shape == (2, 6 * 3 * 2) and conv2.lora_B.shape == (4, 2)
    assert conv2.delta_weight().shape == conv2.base.weight.shape


def test_lora_conv_refuses_grouped_convolutions() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(PlanError, match="groups=2"):
        Lora().prepare(net)


def test_lora_linear_a_is_kaiming_uniform_within_its_bound() -> None:
    layer = LoRALinear(nn.Linear(100, 7), rank=8, alpha=8.0, generator=torch.Generator())
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) · fan_in))
    assert float(layer.lora_A.detach().abs().max()) <= bound
    assert float(layer.lora_A.detach().abs().max()) > 0.8 * bound
    assert torch.equal(layer.lora_B, torch.zeros(7, 8))


# --- a fresh adapter, idempotence and determinism ------------------------------------------------


@pytest.mark.parametrize("make", [_mixed, _cnn], ids=["mixed", "cnn"])
def test_lora_fresh_model_computes_exactly_the_base_output(make: Callable[[], nn.Module]) -> None:
    base = make().eval()
    x = _x() if isinstance(base, Mixed) else torch.randn(3, 1, 28, 28)
    prepared = Lora(rank=4).prepare(make()).eval()
    assert _wrappers(prepared)
    assert torch.equal(prepared(x), base(x))


def test_lora_prepare_twice_gives_the_same_keys_and_tensors() -> None:
    policy = Lora(rank=3, train=("head",))
    once = tree.clone(policy.prepare(_cnn()).state_dict())
    twice = policy.prepare(policy.prepare(_cnn()))
    assert list(twice.state_dict()) == list(once)
    assert tree.equal(twice.state_dict(), once)
    assert all(not _wrappers(w.base) for w in _wrappers(twice).values())


def test_lora_prepare_twice_does_not_redraw_trained_adapters() -> None:
    policy = Lora(rank=3)
    model = policy.prepare(_mixed())
    _randomize_adapters(model)
    before = tree.clone(model.state_dict())
    assert tree.equal(policy.prepare(model).state_dict(), before)


def test_lora_prepare_with_a_key_glob_target_is_idempotent() -> None:
    policy = Lora(targets=("classifier.weight",))
    once = policy.prepare(_cnn())
    assert list(_wrappers(once)) == ["classifier"]
    assert list(policy.prepare(once).state_dict()) == list(once.state_dict())
    assert policy.plan(once).shared == ("classifier.lora_A", "classifier.lora_B")


def test_lora_two_fresh_copies_prepare_bit_identically() -> None:
    a = Lora(rank=4, seed=7).prepare(_cnn()).state_dict()
    b = Lora(rank=4, seed=7).prepare(_cnn()).state_dict()
    assert list(a) == list(b)
    assert tree.equal(a, b)


def test_lora_seed_and_layer_path_change_the_drawn_a() -> None:
    a = Lora(rank=4, seed=0).prepare(_cnn()).state_dict()
    b = Lora(rank=4, seed=1).prepare(_cnn()).state_dict()
    assert not torch.equal(a["embed.1.lora_A"], b["embed.1.lora_A"])
    fan_in_equal = Lora(rank=2).prepare(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    assert not torch.equal(fan_in_equal[0].lora_A, fan_in_equal[1].lora_A)


def test_lora_prepare_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Lora().prepare(_cnn())
    assert torch.equal(torch.rand(3), expected)


# --- plans ---------------------------------------------------------------------------------------

CNN_LORA = tuple(f"{p}.lora_{f}" for p in ("features.0", "features.4", "embed.1") for f in "AB")
HEAD = ("classifier.weight", "classifier.bias")


def test_lora_plan_shares_the_factors_and_the_trained_head() -> None:
    policy = Lora(rank=4, train=("head",))
    model = policy.prepare(_cnn())
    plan = policy.plan(model)
    assert plan.shared == (*CNN_LORA, *HEAD)
    assert not plan.local
    assert set(plan.frozen) == set(model.state_dict()) - set(plan.shared)
    assert "features.0.base.weight" in plan.frozen and "features.1.running_mean" in plan.frozen


def test_lora_ffa_freezes_a_and_shares_only_b() -> None:
    policy = Lora(rank=4, train=("head",), ffa=True)
    plan = policy.plan(policy.prepare(_cnn()))
    a_keys = tuple(k for k in CNN_LORA if k.endswith("lora_A"))
    b_keys = tuple(k for k in CNN_LORA if k.endswith("lora_B"))
    assert plan.shared == (*b_keys, *HEAD)
    assert set(a_keys) <= set(plan.frozen)


def test_lora_without_train_adapts_the_head_too() -> None:
    policy = Lora(rank=2)
    plan = policy.plan(policy.prepare(_cnn()))
    assert plan.shared == (*CNN_LORA, "classifier.lora_A", "classifier.lora_B")


def test_lora_plan_of_an_unprepared_model_asks_for_prepare() -> None:
    with pytest.raises(PlanError, match=r"prepare"):
        Lora().plan(_cnn())


def test_lora_gradient_reaches_only_the_trainable_keys() -> None:
    policy = Lora(rank=2, train=("head",))
    model = policy.prepare(_cnn())
    _randomize_adapters(model)
    plan = policy.plan(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in plan.trainable)
    model(torch.randn(2, 1, 28, 28)).square().sum().backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == (name in plan.shared), name
    assert plan.trainable == set(plan.shared)


# --- selectors and configuration errors ----------------------------------------------------------


def test_lora_default_targets_work_on_a_model_without_convolutions() -> None:
    model = Lora().prepare(_mlp())
    assert list(_wrappers(model)) == ["0", "3"]


def test_lora_conv_only_target_on_a_model_without_convolutions_is_an_error() -> None:
    with pytest.raises(PlanError, match=r"no layer to adapt.*\['0', '3'\]"):
        Lora(targets=("type:Conv2d",)).prepare(_mlp())


def test_lora_target_selecting_no_linear_or_conv_lists_the_layers() -> None:
    with pytest.raises(PlanError, match=r"'features.1'.*\['features.0', 'features.4'"):
        Lora(targets=("features.1",)).prepare(_cnn())


def test_lora_target_typo_lists_near_misses() -> None:
    with pytest.raises(PlanError, match=r"Lora.targets.*near misses.*'classifier'"):
        Lora(targets=("clasifier",)).prepare(_cnn())


def test_lora_type_target_typo_is_an_error() -> None:
    with pytest.raises(PlanError, match="Conv2D"):
        Lora(targets=("type:Conv2D",)).prepare(_cnn())


def test_lora_train_covering_every_target_is_an_error() -> None:
    with pytest.raises(PlanError, match="no layer to adapt"):
        Lora(targets=("head",), train=("head",)).prepare(_cnn())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be"),
        ({"rank": True}, "rank must be"),
        ({"alpha": 0.0}, "alpha must be"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"targets": "type:Linear"}, "tuple of selector strings"),
        ({"targets": ()}, "targets is empty"),
    ],
)
def test_lora_rejects_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Lora(**kwargs)  # type: ignore[arg-type]


# --- the policy contract (as tests/contracts/test_policies.py) -----------------------------------

MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": _cnn, "seq_bn": _mlp, "mixed": _mixed}
POLICIES = [Lora(), Lora(rank=2, train=("head",)), Lora(rank=4, ffa=True)]


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return MODELS[request.param]()


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_lora_contract_labels_are_complete_and_disjoint(
    policy: TransferPolicy, model: nn.Module
) -> None:
    prepared = policy.prepare(model)
    plan = policy.plan(prepared)
    assert list(plan.labels) == list(prepared.state_dict())
    groups = [plan.shared, plan.local, plan.frozen]
    assert sum(len(g) for g in groups) == len(prepared.state_dict())
    assert set().union(*map(set, groups)) == set(prepared.state_dict())
    assert plan.shared
    assert plan.trainable <= plan.parameters
    assert plan.parameters == {name for name, _ in prepared.named_parameters()}
    assert not plan.trainable & set(plan.frozen)


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_lora_contract_prepare_is_idempotent(policy: TransferPolicy, model: nn.Module) -> None:
    once = policy.prepare(model)
    once_keys, once_plan = list(once.state_dict()), policy.plan(once)
    twice = policy.prepare(policy.prepare(once))
    assert list(twice.state_dict()) == once_keys
    assert dict(policy.plan(twice).labels) == dict(once_plan.labels)
    assert policy.plan(twice).parameters == once_plan.parameters


def test_lora_is_a_transfer_policy_and_hashable() -> None:
    assert isinstance(Lora(), TransferPolicy)
    assert hash(Lora(rank=2)) == hash(Lora(rank=2))
    assert repr(Lora(rank=2, ffa=True)).startswith("Lora(rank=2, alpha=8.0")
