"""FedBuff in simulated time: same code as the synchronous round, staleness weights, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import NUM_CLIENTS, make_tiny_model

from fedtransfer import Recipe, ServerState, run_round
from fedtransfer.codecs import Payload
from fedtransfer.data import FederatedDataset
from fedtransfer.errors import ConfigError
from fedtransfer.rounds.buffered import ClientDelays, FedBuff, run_buffered_step
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.state import load_state, save_state


def _steps(
    recipe: Recipe, state: ServerState, data: FederatedDataset, fedbuff: FedBuff, n: int
) -> ServerState:
    for _ in range(n):
        state, _ = run_buffered_step(
            recipe, state, data, SerialRuntime(), model_fn=make_tiny_model, fedbuff=fedbuff
        )
    return state


def test_fedbuff_with_whole_population_buffer_is_a_synchronous_round(
    tiny_recipe: Recipe, tiny_state: ServerState, tiny_data: FederatedDataset, single_thread: None
) -> None:
    fedbuff = FedBuff(buffer_size=NUM_CLIENTS, concurrency=NUM_CLIENTS)
    sync, _ = run_round(
        tiny_recipe, tiny_state, tiny_data, SerialRuntime(), model_fn=make_tiny_model
    )
    buffered, report = run_buffered_step(
        tiny_recipe,
        tiny_state,
        tiny_data,
        SerialRuntime(),
        model_fn=make_tiny_model,
        fedbuff=fedbuff,
    )
    assert sorted(report.accepted) == sorted(tiny_data.clients)
    assert report.metrics["async/staleness_max"] == 0.0
    for k in sync.params:
        torch.testing.assert_close(buffered.params[k], sync.params[k], rtol=1e-6, atol=1e-7)
    assert buffered.ledger == sync.ledger
    assert buffered.inflight.pending == ()


def test_fedbuff_keeps_concurrency_minus_buffer_in_flight_and_time_moves_forward(
    tiny_recipe: Recipe, tiny_state: ServerState, tiny_data: FederatedDataset, single_thread: None
) -> None:
    fedbuff = FedBuff(buffer_size=2, concurrency=4, delays=ClientDelays(mean=1.0, spread=1.0))
    state, clocks, stale = tiny_state, [], []
    for _ in range(6):
        state, report = run_buffered_step(
            tiny_recipe,
            state,
            tiny_data,
            SerialRuntime(),
            model_fn=make_tiny_model,
            fedbuff=fedbuff,
        )
        assert len(state.inflight.pending) == 2
        assert len(report.cohort) == 2
        clocks.append(state.inflight.clock)
        stale.append(report.metrics["async/staleness_max"])
        in_flight = [p.result.client for p in state.inflight.pending]
        assert len(set(in_flight)) == len(in_flight)
    assert clocks == sorted(clocks) and clocks[0] > 0
    assert max(stale) >= 1.0  # some updates were trained on an older version


def test_fedbuff_scales_a_stale_update_by_its_staleness_weight(
    tiny_recipe: Recipe, tiny_state: ServerState, tiny_data: FederatedDataset, single_thread: None
) -> None:
    """K = 1: each version is the one arriving update times s(τ) (Mean of one, ServerSGD lr 1)."""
    fedbuff = FedBuff(buffer_size=1, concurrency=3, staleness_exponent=0.5)
    state = _steps(tiny_recipe, tiny_state, tiny_data, fedbuff, 3)
    checked = []
    for _ in range(8):
        before = {p.result.client: p for p in state.inflight.pending}
        new, report = run_buffered_step(
            tiny_recipe,
            state,
            tiny_data,
            SerialRuntime(),
            model_fn=make_tiny_model,
            fedbuff=fedbuff,
        )
        (client,) = report.accepted
        if client in before:  # dispatched at an earlier version: its update is known
            old = before[client]
            update = tiny_recipe.uplink.decode(Payload.from_bytes(old.result.uplink))
            tau = state.round - old.version
            for k, v in update.items():
                if v.dtype.is_floating_point:
                    expected = state.params[k] + (1.0 + tau) ** -0.5 * v
                    torch.testing.assert_close(new.params[k], expected, rtol=1e-5, atol=1e-6)
            checked.append(tau)
        state = new
    assert max(checked) >= 1


def test_fedbuff_resume_from_checkpoint_is_bit_identical(
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tmp_path: Path,
    single_thread: None,
) -> None:
    fedbuff = FedBuff(buffer_size=2, concurrency=4)
    mid = _steps(tiny_recipe, tiny_state, tiny_data, fedbuff, 3)
    save_state(mid, tmp_path)
    loaded = load_state(tmp_path)
    assert [p.meta() for p in loaded.inflight.pending] == [p.meta() for p in mid.inflight.pending]
    a = _steps(tiny_recipe, mid, tiny_data, fedbuff, 3)
    b = _steps(tiny_recipe, loaded, tiny_data, fedbuff, 3)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a.inflight.clock == b.inflight.clock and a.ledger == b.ledger


def test_fedbuff_rejects_impossible_settings() -> None:
    with pytest.raises(ConfigError, match="buffer_size 5 > concurrency 3"):
        FedBuff(buffer_size=5, concurrency=3)
    with pytest.raises(ConfigError, match="concurrency"):
        FedBuff(buffer_size=1, concurrency=0)
    with pytest.raises(ConfigError, match="mean"):
        ClientDelays(mean=0.0)


def test_fedbuff_concurrency_larger_than_population_is_an_error(
    tiny_recipe: Recipe, tiny_state: ServerState, tiny_data: FederatedDataset
) -> None:
    with pytest.raises(ConfigError, match="exceeds the population"):
        run_buffered_step(
            tiny_recipe,
            tiny_state,
            tiny_data,
            SerialRuntime(),
            model_fn=make_tiny_model,
            fedbuff=FedBuff(buffer_size=1, concurrency=NUM_CLIENTS + 1),
        )


def test_client_delays_are_seeded_per_client_and_job() -> None:
    d = ClientDelays(mean=1.0, spread=1.0)
    assert d.duration("c0", seed=0, job=1) == d.duration("c0", seed=0, job=1)
    assert d.duration("c0", seed=0, job=1) != d.duration("c0", seed=0, job=2)
    assert d.duration("c0", seed=0, job=1) != d.duration("c0", seed=1, job=1)
    assert AllClients().sample(["a"], seed=0, round=1) == ["a"]


def test_fedbuff_reports_malicious_clients_among_the_arrivals(
    tiny_recipe: Recipe, tiny_state: ServerState, tiny_data: FederatedDataset
) -> None:
    from fedtransfer.robustness import SignFlip, Threat

    _, report = run_buffered_step(
        tiny_recipe,
        tiny_state,
        tiny_data,
        SerialRuntime(),
        model_fn=make_tiny_model,
        fedbuff=FedBuff(buffer_size=NUM_CLIENTS, concurrency=NUM_CLIENTS),
        threat=Threat(SignFlip(), fraction=0.4),
    )
    assert report.metrics["attack/malicious"] == 2.0
