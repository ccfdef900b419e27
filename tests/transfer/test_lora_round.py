"""LoRA through the real ``run_round``: FFA-LoRA aggregates the clients' weight deltas exactly,
plain LoRA does not (the mean of products is not the product of means)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import RecordingRuntime, make_tiny_model
from torch import Tensor

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, fedavg, run_round, tree
from fedtransfer.codecs import Payload
from fedtransfer.data import FederatedDataset
from fedtransfer.transfer.lora import Lora

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = ("body.1", "head")
LOCAL = LocalTraining(lr=0.2, steps=4, batch_size=8)


def _one_round(
    policy: Lora, data: FederatedDataset
) -> tuple[Recipe, ServerState, ServerState, list[Reply]]:
    """Start (with non-zero global ``B`` so every factor trains from step one), one round."""
    recipe = fedavg(policy, training=LOCAL, clients_per_round=3)
    recipe.validate(make_tiny_model(), population=data.clients)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    gen = torch.Generator().manual_seed(5)
    params = {
        k: torch.randn(v.shape, generator=gen) * 0.3 if k.endswith("lora_B") else v
        for k, v in state.params.items()
    }
    state = state.replace(params=params)
    runtime = RecordingRuntime()
    new, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert len(report.accepted) == len(runtime.results) == 3
    return recipe, state, new, runtime.results


def _client_factors(
    recipe: Recipe, old: ServerState, results: list[Reply], key: str
) -> list[Tensor]:
    """Each client's trained value of ``key``: the global value plus its decoded update."""
    out = []
    for res in results:
        update = recipe.uplink.decode(Payload.from_bytes(res.uplink))
        out.append(old.weights_for(None)[key] + update[key])
    return out


def _mean(values: list[Tensor], results: list[Reply]) -> Tensor:
    weights = [float(r.num_examples) for r in results]
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def test_lora_ffa_round_averages_the_client_weight_deltas_exactly(
    tiny_data: FederatedDataset,
) -> None:
    policy = Lora(rank=2, alpha=4.0, targets=("type:Linear",), ffa=True)
    recipe, old, new, results = _one_round(policy, tiny_data)
    s = policy.alpha / policy.rank
    assert all(k.endswith("lora_B") for k in new.params)
    for layer in LAYERS:
        a = new.weights_for(None)[f"{layer}.lora_A"]
        assert torch.equal(
            a, old.distribution.start[f"{layer}.lora_A"]
        )  # frozen, identical everywhere
        bs = _client_factors(recipe, old, results, f"{layer}.lora_B")
        assert not torch.allclose(bs[0], bs[1])
        client_mean = _mean([s * b @ a for b in bs], results)
        global_delta = s * new.params[f"{layer}.lora_B"] @ a
        torch.testing.assert_close(global_delta, client_mean, rtol=0, atol=1e-6)
        moved = float((client_mean - s * old.params[f"{layer}.lora_B"] @ a).abs().max())
        assert moved > 1e-3


def test_lora_plain_round_does_not_average_the_client_weight_deltas(
    tiny_data: FederatedDataset,
) -> None:
    """Both factors train: the server's mean factors are exact means, yet s·B̄·Ā differs from
    the mean of the clients' s·Bᵢ·Aᵢ — what FFA-LoRA avoids."""
    policy = Lora(rank=2, alpha=4.0, targets=("type:Linear",))
    recipe, old, new, results = _one_round(policy, tiny_data)
    s = policy.alpha / policy.rank
    for layer in LAYERS:
        a_key, b_key = f"{layer}.lora_A", f"{layer}.lora_B"
        As = _client_factors(recipe, old, results, a_key)
        bs = _client_factors(recipe, old, results, b_key)
        torch.testing.assert_close(new.params[a_key], _mean(As, results), rtol=0, atol=1e-6)
        torch.testing.assert_close(new.params[b_key], _mean(bs, results), rtol=0, atol=1e-6)
        client_mean = _mean([s * b @ a for a, b in zip(As, bs, strict=True)], results)
        global_delta = s * new.params[b_key] @ new.params[a_key]
        assert float((global_delta - client_mean).abs().max()) > 1e-3, layer


def test_lora_round_shares_factors_and_trained_head_and_keeps_the_rest(
    tiny_data: FederatedDataset,
) -> None:
    policy = Lora(rank=2, targets=("type:Linear",), train=("head",))
    _, old, new, _ = _one_round(policy, tiny_data)
    assert list(new.params) == ["body.1.lora_A", "body.1.lora_B", "head.weight", "head.bias"]
    frozen = [k for k in old.distribution.start if k not in new.params]
    assert tree.equal(
        tree.select(new.weights_for("c0"), frozen), tree.select(old.distribution.start, frozen)
    )
    assert not tree.equal(new.params, old.params)
