"""Contract suite for server update transforms (server optimisers) and their pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import Tensor

from fedtransfer import ConfigError, tree
from fedtransfer.server import (
    Mean,
    ServerAdagrad,
    ServerAdam,
    ServerPipeline,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.types import UpdateContext

TRANSFORMS: list[UpdateTransform] = [
    ServerSGD(),
    ServerSGD(lr=0.5, momentum=0.9),
    ServerAdam(),
    ServerYogi(),
    ServerAdagrad(),
]


@pytest.fixture(params=TRANSFORMS, ids=repr)
def transform(request: pytest.FixtureRequest) -> UpdateTransform:
    return request.param


def _params() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 4, generator=gen),
        "fc.bias": torch.randn(3, generator=gen),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }


def _update(seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(3, 4, generator=gen),
        "fc.bias": torch.randn(3, generator=gen),
        "bn.num_batches_tracked": torch.tensor(2, dtype=torch.int64),
    }


def _assert_flat_tensor_state(state: object) -> None:
    assert isinstance(state, dict)
    assert all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())


def test_transform_is_an_update_transform(transform: UpdateTransform) -> None:
    """``apply`` on a first update returns an :class:`Out`: a step for every key, whose floating
    coordinates move along the update (the update is a negative pseudo-gradient, so a server
    optimiser steps with it, never against it), and flat tensor state and float metrics."""
    assert isinstance(transform, UpdateTransform)
    params, update = _params(), _update()
    out = transform.apply(update, transform.init(params), UpdateContext(params))
    assert set(out.value) == set(update)
    for k, v in update.items():
        if v.dtype.is_floating_point:
            assert torch.equal(torch.sign(out.value[k]), torch.sign(v)), k
    _assert_flat_tensor_state(out.state)
    assert all(isinstance(k, str) and isinstance(m, float) for k, m in out.metrics.items())


def test_transform_init_state_is_flat_dict_of_tensors(transform: UpdateTransform) -> None:
    _assert_flat_tensor_state(transform.init(_params()))


def test_transform_init_state_roundtrips_through_safetensors(transform: UpdateTransform) -> None:
    state = transform.init(_params())
    assert tree.equal(load(save(dict(state))), state)


def test_transform_applied_state_roundtrips_through_safetensors(
    transform: UpdateTransform,
) -> None:
    params = _params()
    state = transform.apply(_update(), transform.init(params), UpdateContext(params)).state
    _assert_flat_tensor_state(state)
    assert tree.equal(load(save(dict(state))), state)


def test_transform_apply_does_not_mutate_inputs(transform: UpdateTransform) -> None:
    params = _params()
    state = transform.apply(_update(2), transform.init(params), UpdateContext(params)).state
    update = _update(3)
    before = (tree.clone(update), tree.clone(state), tree.clone(params))
    transform.apply(update, state, UpdateContext(params))
    assert tree.equal(update, before[0])
    assert tree.equal(state, before[1])
    assert tree.equal(params, before[2])


def test_transform_apply_is_deterministic(transform: UpdateTransform) -> None:
    params = _params()
    state = transform.init(params)
    a = transform.apply(_update(), state, UpdateContext(params))
    b = transform.apply(_update(), state, UpdateContext(params))
    assert tree.equal(a.value, b.value)
    assert tree.equal(a.state, b.state)


def test_transform_passes_integer_tensors_through(transform: UpdateTransform) -> None:
    params = _params()
    update = _update()
    out = transform.apply(update, transform.init(params), UpdateContext(params)).value
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(out["bn.num_batches_tracked"], update["bn.num_batches_tracked"])


def test_transform_keeps_keys_shapes_and_dtypes(transform: UpdateTransform) -> None:
    params = _params()
    update = _update()
    out = transform.apply(update, transform.init(params), UpdateContext(params)).value
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (v.shape, v.dtype) for k, v in update.items()
    }


def test_transform_zero_update_with_zero_state_gives_zero_step(
    transform: UpdateTransform,
) -> None:
    params = _params()
    zero = tree.zeros_like(params)
    out = transform.apply(zero, transform.init(params), UpdateContext(params)).value
    assert tree.equal(out, zero)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ServerSGD(lr=0.0),
        lambda: ServerSGD(lr=-1.0),
        lambda: ServerSGD(lr=float("nan")),
        lambda: ServerSGD(momentum=1.0),
        lambda: ServerSGD(momentum=-0.1),
        lambda: ServerAdam(lr=0.0),
        lambda: ServerAdam(tau=0.0),
        lambda: ServerAdam(beta1=1.0),
        lambda: ServerAdam(beta2=1.5),
        lambda: ServerAdam(beta1=-0.1),
        lambda: ServerYogi(lr=-0.01),
        lambda: ServerYogi(beta2=1.0),
        lambda: ServerAdagrad(lr=0.0),
        lambda: ServerAdagrad(initial_accumulator=-1.0),
        lambda: ServerAdagrad(initial_accumulator=float("nan")),
    ],
    ids=[
        "sgd-lr0",
        "sgd-lr-neg",
        "sgd-lr-nan",
        "sgd-momentum1",
        "sgd-momentum-neg",
        "adam-lr0",
        "adam-tau0",
        "adam-beta1-1",
        "adam-beta2-1.5",
        "adam-beta1-neg",
        "yogi-lr-neg",
        "yogi-beta2-1",
        "adagrad-lr0",
        "adagrad-acc-neg",
        "adagrad-acc-nan",
    ],
)
def test_transform_invalid_settings_raise_config_error(build: object) -> None:
    with pytest.raises(ConfigError):
        build()  # type: ignore[operator]


def test_pipeline_init_namespaces_two_post_transforms() -> None:
    params = _params()
    pipe = ServerPipeline(post=(ServerSGD(lr=0.5, momentum=0.9), ServerAdam()))
    state = pipe.init(params)
    assert set(state) == {
        "post/0/v/fc.weight",
        "post/0/v/fc.bias",
        "post/1/m/fc.weight",
        "post/1/m/fc.bias",
        "post/1/v/fc.weight",
        "post/1/v/fc.bias",
    }


def test_pipeline_apply_equals_manual_composition_of_two_post_transforms() -> None:
    params = _params()
    sgd, adam = ServerSGD(lr=0.5, momentum=0.9), ServerAdam(lr=0.1)
    pipe = ServerPipeline(post=(sgd, adam))
    updates, weights = [_update(1), _update(2)], [1.0, 3.0]
    state = pipe.init(params)
    for _ in range(2):  # two rounds, so the second reads the namespaced state back
        out = pipe.apply(updates, weights, params=params, state=state)
        agg = Mean().aggregate(updates, weights, {}).value
        s0 = {k.removeprefix("post/0/"): v for k, v in state.items() if k.startswith("post/0/")}
        s1 = {k.removeprefix("post/1/"): v for k, v in state.items() if k.startswith("post/1/")}
        first = sgd.apply(agg, s0, UpdateContext(params))
        second = adam.apply(first.value, s1, UpdateContext(params))
        assert tree.equal(out.value, second.value)
        expected_state = {f"post/0/{k}": v for k, v in first.state.items()}
        expected_state |= {f"post/1/{k}": v for k, v in second.state.items()}
        assert tree.equal(out.state, expected_state)
        state = out.state


def test_pipeline_state_roundtrips_through_safetensors() -> None:
    params = _params()
    pipe = ServerPipeline(post=(ServerSGD(lr=0.5, momentum=0.9), ServerYogi()))
    state = pipe.apply([_update()], [1.0], params=params, state=pipe.init(params)).state
    assert tree.equal(load(save(dict(state))), state)
