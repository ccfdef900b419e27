"""Contract: the byte ledger is the real payloads, and only ``shared`` keys travel — for every
codec and every kind of policy (frozen, local and adapter keys)."""

from __future__ import annotations

import pytest
from tests.conftest import RecordingRuntime, make_tiny_data, make_tiny_model

from fedtransfer import LocalTraining, Recipe, ServerState, run_round
from fedtransfer.codecs import BFloat16, Codec, Exact, Float16, Float32, Int8, Payload, TopK
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full, HeadOnly, LocalBatchNorm, Lora
from fedtransfer.transfer.plan import TransferPolicy

pytestmark = pytest.mark.usefixtures("single_thread")

CODECS: list[Codec] = [Float32(), Float16(), BFloat16(), Int8(), Int8("channel"), TopK(0.1)]
POLICIES: list[TransferPolicy] = [
    Full(),
    HeadOnly(),
    LocalBatchNorm(),
    Lora(rank=2, train=("head",)),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_ledger_counts_the_payloads_of_shared_keys_only(
    codec: Codec, policy: TransferPolicy
) -> None:
    downlink = Float32() if getattr(codec, "sparse", False) else codec
    recipe = Recipe(
        policy=policy,
        training=LocalTraining(lr=0.05, steps=2, batch_size=8),
        downlink=downlink,
        uplink=codec,
        sampler=AllClients(),
    )
    data = make_tiny_data()
    plan = recipe.validate(make_tiny_model(), population=data.clients)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    runtime = RecordingRuntime()
    new, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    n = len(data.clients)
    assert report.accepted == tuple(data.clients)
    assert report.setup_bytes == n * len(Exact().encode(state.distribution.start).to_bytes())
    assert report.bytes_down == n * len(downlink.encode(state.params).to_bytes())
    assert report.bytes_up == sum(len(r.uplink) for r in runtime.results)
    for res in runtime.results:
        sent = codec.decode(Payload.from_bytes(res.uplink))
        assert list(sent) == list(plan.shared)  # no frozen key, no local key
        assert set(res.local) == set(plan.local)
    assert new.ledger == {
        "setup": report.setup_bytes,
        "up": report.bytes_up,
        "down": report.bytes_down,
    }
