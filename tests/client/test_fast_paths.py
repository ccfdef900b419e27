"""The fast paths of the client and server hot loop give exactly what the slow ones give."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtransfer import LocalTraining
from fedtransfer.client.train import _SGD, local_train
from fedtransfer.client.update import load_weights
from fedtransfer.codecs import Exact, Float32, Payload
from fedtransfer.data import TensorData
from fedtransfer.errors import UpdateRejected
from fedtransfer.server.validate import validate_update
from fedtransfer.transfer import Full, HeadOnly


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _data(n: int = 40) -> TensorData:
    g = torch.Generator().manual_seed(1)
    return TensorData(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3)])
def test_sgd_matches_torch_optim_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    spec = LocalTraining(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ours, ref = _net(), _net()
    mine = _SGD(spec, list(ours.parameters()))
    theirs = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    data = _data()
    for step in range(6):
        x, y = data.x[step * 6 : step * 6 + 6], data.y[step * 6 : step * 6 + 6]
        for model, opt in ((ours, mine), (ref, theirs)):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 2:  # a parameter without a gradient is skipped, as torch.optim does
                loss = nn.functional.cross_entropy(model[:2](x)[:, :3], y)
            loss.backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_local_train_leaves_eval_mode_and_grad_flags_and_respects_frozen_modules() -> None:
    model = _net()
    plan = HeadOnly().plan(HeadOnly().prepare(model))
    seen: list[bool] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local_train(model, plan, _data(), LocalTraining(), generator=torch.Generator().manual_seed(0))
    assert seen and not any(seen)  # the frozen BatchNorm ran in eval mode
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert not torch.equal(after["3.weight"], before["3.weight"])
    # a second call with another plan object over the same model trains everything
    local_train(model, Full().plan(model), _data(), LocalTraining(), generator=torch.Generator())
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])


def test_local_train_notices_replaced_parameters() -> None:
    model = _net()
    plan = Full().plan(model)
    local_train(model, plan, _data(), LocalTraining(), generator=torch.Generator())
    model[3].weight = nn.Parameter(torch.zeros(3, 5))
    local_train(model, plan, _data(), LocalTraining(), generator=torch.Generator())
    assert not torch.equal(model[3].weight.detach(), torch.zeros(3, 5))


def test_load_weights_equals_load_state_dict() -> None:
    src = _net(1).state_dict()
    fast, slow = _net(2), _net(2)
    load_weights(fast, dict(src))
    slow.load_state_dict(src, strict=True)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, slow.state_dict()[k]), k
        assert torch.equal(v, src[k]), k
    src["0.weight"][0, 0] = 42.0  # copied, not aliased
    assert fast.state_dict()["0.weight"][0, 0] != 42.0


def test_load_weights_errors_are_load_state_dicts() -> None:
    weights = dict(_net().state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(_net(), {**weights, "0.weight": torch.zeros(2, 2)})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(_net(), {k: v for k, v in weights.items() if k != "0.bias"})


def test_load_weights_honours_load_hooks() -> None:
    model = _net()
    calls: list[str] = []
    model.register_load_state_dict_post_hook(lambda m, keys: calls.append("post"))
    load_weights(model, dict(_net(1).state_dict()))
    assert calls == ["post"]


def _ref(*shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"k{i}": torch.zeros(s) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_validate_rejects_non_finite_values_by_key(bad: float) -> None:
    ref = _ref((3, 4), (5,))
    update = {k: torch.ones_like(v) for k, v in ref.items()}
    update["k1"][2] = bad
    with pytest.raises(UpdateRejected, match="'k1' holds 1 non-finite"):
        validate_update(update, 1, reference=ref, client="c", round=1)


def test_validate_accepts_finite_values_whose_sum_overflows() -> None:
    ref = _ref((4,), (2,))
    update = {"k0": torch.full((4,), 3e38), "k1": torch.full((2,), 3e38)}
    assert not torch.isfinite(update["k0"].sum())  # the fast check cannot decide here
    validate_update(update, 1, reference=ref, client="c", round=1)


def test_payload_header_cache_keeps_payloads_apart() -> None:
    codec = Float32()
    a = codec.encode({"w": torch.arange(4.0), "b": torch.ones(2)}).to_bytes()
    b = codec.encode({"w": torch.arange(4.0) * 2, "b": torch.zeros(2)}).to_bytes()
    other = codec.encode({"w": torch.arange(6.0)}).to_bytes()
    assert a[: len(a) - 24] == b[: len(b) - 24]  # one layout, one header
    da, db = codec.decode(Payload.from_bytes(a)), codec.decode(Payload.from_bytes(b))
    assert torch.equal(da["w"], torch.arange(4.0)) and torch.equal(db["w"], torch.arange(4.0) * 2)
    assert torch.equal(codec.decode(Payload.from_bytes(other))["w"], torch.arange(6.0))
    meta = Payload.from_bytes(a).entries[0].meta
    with pytest.raises(TypeError):
        meta["x"] = 1  # type: ignore[index]  # shared parsed headers are read-only


def test_verify_start_reuses_only_an_identical_verification() -> None:
    from fedtransfer import tree
    from fedtransfer.client.update import SETUP_CODEC, verify_start
    from fedtransfer.errors import CompatibilityError

    weights = dict(_net().state_dict())
    sha = tree.sha256(weights)
    setup = SETUP_CODEC.encode(weights).to_bytes()
    first = verify_start(setup, sha, client="a")
    again = verify_start(bytes(bytearray(setup)), sha, client="b")  # equal bytes: remembered
    assert tree.equal(first, weights) and tree.equal(again, weights)
    tampered = bytearray(setup)
    tampered[-1] ^= 1
    with pytest.raises(CompatibilityError, match="client c: starting weights sha256"):
        verify_start(bytes(tampered), sha, client="c")
    with pytest.raises(CompatibilityError, match="client d: starting weights sha256"):
        verify_start(setup, "0" * 64, client="d")
    assert tree.equal(verify_start(setup, sha, client="e"), weights)


def test_weighted_mean_keeps_the_arithmetic_of_the_plain_loop() -> None:
    """Aggregation must not change a run's bits (the default run's rounds-to-target depend
    on them): the batched form equals ``acc += t.double() * (w / total)`` exactly."""
    from fedtransfer import tree

    g = torch.Generator().manual_seed(0)
    trees = [
        {"a": torch.randn(1000, generator=g), "b": torch.randn(33, 7, generator=g)}
        for _ in range(40)
    ]
    weights = [float(i % 7 + 1) for i in range(40)]
    total = sum(weights)
    expected = {}
    for k in ("a", "b"):
        acc = torch.zeros(trees[0][k].shape, dtype=torch.float64)
        for t, w in zip(trees, weights, strict=True):
            acc += t[k].double() * (w / total)
        expected[k] = acc.float()
    # separate tensors, trees whose tensors lie end to end in one buffer (a decoded payload:
    # aggregated in one call per tree), and a mix of both: the same bits
    decoded = [Float32().decode(Payload.from_bytes(Float32().encode(t).to_bytes())) for t in trees]
    assert all(tree.flat(list(t.values())) is not None for t in decoded)
    assert tree.flat(list(trees[0].values())) is None
    mixed = [d if i % 3 else t for i, (t, d) in enumerate(zip(trees, decoded, strict=True))]
    for given in (trees, decoded, mixed):
        out = tree.weighted_mean(given, weights)
        for k in ("a", "b"):
            assert torch.equal(out[k], expected[k]), k
    # float64 trees: the inputs are never scaled in place
    doubles = [
        Exact().decode(Payload.from_bytes(Exact().encode(tree.cast(t, torch.float64)).to_bytes()))
        for t in trees[:3]
    ]
    before = [tree.clone(t) for t in doubles]
    tree.weighted_mean(doubles, [1.0, 2.0, 3.0])
    assert all(tree.equal(a, b) for a, b in zip(doubles, before, strict=True))
    with pytest.raises(ValueError, match="'b' has shape"):
        tree.weighted_mean([trees[0], {"a": trees[1]["a"], "b": trees[1]["b"].t()}], [1.0, 1.0])


def test_flat_only_spans_tensors_laid_end_to_end() -> None:
    from fedtransfer import tree

    buf = torch.arange(12.0)
    assert torch.equal(tree.flat([buf[:4].view(2, 2), buf[4:12]]), buf)
    assert torch.equal(tree.flat([buf[2:5], buf[5:7]]), buf[2:7])
    assert tree.flat([buf[4:8], buf[:4]]) is None  # out of order
    assert tree.flat([buf[:4], buf[5:8]]) is None  # a gap
    assert tree.flat([buf[:6].view(2, 3).t(), buf[6:]]) is None  # not contiguous
    assert tree.flat([buf[:4], buf.double()[4:]]) is None  # another dtype
    assert tree.flat([buf[:4], torch.arange(8.0)]) is None  # another storage
    assert tree.flat([]) is None
