"""Secure aggregation without the transport: its checks before round 1, the norm bound each
client applies, and rounds whose exact weighted mean equals the simulator's norm_bound run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedtransfer import tree
from fedtransfer.deploy.federation import Holdings, client_round, deployed_round
from fedtransfer.deploy.secure import SecureAggregation, bounded, secure_sum
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.run import build_population, load_config, run_experiment, start_state
from fedtransfer.rounds.messages import Request
from fedtransfer.state import load_state
from fedtransfer.types import Params

pytestmark = pytest.mark.usefixtures("single_thread")

ARM = "pretrained-full"
BASE = [
    "rounds=3",
    "data.num_clients=4",
    "sampler.clients_per_round=3",
    "pretrain.training.epochs=1",
    "personalization=null",
    "aggregator={kind: norm_bound, c: 0.5}",
    f"arms.{ARM}.policy={{kind: local_batchnorm}}",
]


def _config(extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    cfg = load_config(Path(__file__).parents[2] / "configs" / "default.yaml", [*BASE, *extra])
    return replace(cfg, arms=tuple(a for a in cfg.arms if a.name == ARM))


def _check(cfg, cohort: int = 3, settings: SecureAggregation | None = None) -> float:  # type: ignore[no-untyped-def]
    recipe = cfg.recipe(cfg.arms[0])
    model = recipe.policy.prepare(cfg.model())
    plan = recipe.policy.plan(model)
    params = tree.select(model.state_dict(), plan.shared)
    return (settings or SecureAggregation()).clipping_range(
        recipe, cohort, params=params, plan=plan
    )


def test_clipping_range_is_the_norm_bound() -> None:
    assert _check(_config()) == 0.5


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("aggregator={kind: mean}",), "expected norm_bound"),
        (("objective={kind: scaffold}",), "extras"),
        ((f"arms.{ARM}.policy={{kind: full}}",), "integers"),
    ],
)
def test_settings_secure_aggregation_cannot_serve_are_refused(
    extra: tuple[str, ...], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _check(_config(extra))


def test_small_cohorts_and_overflowing_ranges_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 3 clients"):
        _check(_config(), cohort=2)
    wide = SecureAggregation(quantization_range=2**31, modulus_range=2**32)
    with pytest.raises(ConfigError, match="below modulus_range"):
        _check(_config(), settings=wide)


def test_settings_are_validated_when_made() -> None:
    with pytest.raises(ConfigError, match="num_shares: a fraction"):
        SecureAggregation(num_shares=3)
    with pytest.raises(ConfigError, match="power of 2"):
        SecureAggregation(modulus_range=3 * 2**22)


def test_bounded_scales_only_updates_over_the_bound() -> None:
    big = {"w": torch.tensor([3.0, 4.0])}
    assert torch.allclose(bounded(big, 1.0)["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    small = {"w": torch.tensor([0.3, 0.4])}
    assert torch.equal(bounded(small, 1.0)["w"], small["w"].double())


def test_secure_rounds_with_an_exact_sum_follow_the_simulator(tmp_path: Path) -> None:
    cfg = _config()
    run_experiment(cfg, tmp_path / "sim")
    simulated = load_state(tmp_path / "sim" / "checkpoints" / ARM)
    _, recipe, state = start_state(cfg, tmp_path / "dep", ARM)
    uplink = recipe.recipe_at(1).uplink  # one stage: the arm's recipe
    population = build_population(cfg)
    held = {c: Holdings() for c in population.clients}
    seen: list[int] = []

    def send(requests: list[Request]) -> tuple[Params, float, int]:
        ups, ws = [], []
        for req in requests:
            reply, held[req.client] = client_round(
                req, held[req.client], population.train[req.client], recipe, model_fn=cfg.model
            )
            from fedtransfer.codecs import Payload

            ups.append(bounded(uplink.decode(Payload.from_bytes(reply.uplink)), 0.5))
            ws.append(float(reply.num_examples))
        seen.append(len(requests))
        return tree.weighted_mean(ups, ws), sum(ws), 1234

    for _ in range(3):
        summed = secure_sum(send, uplink=uplink, params=state.params)
        state, rep = deployed_round(recipe, state, population.clients, summed, model_fn=cfg.model)
        assert rep.accepted == ("secure-sum",) and rep.bytes_up == 1234
    assert seen == [3, 3, 3] and state.ledger["up"] == 3 * 1234
    gap = max(
        float((state.params[k].double() - simulated.params[k].double()).abs().max())
        for k in state.params
    )
    assert gap < 1e-5


def test_a_secure_round_without_a_sum_leaves_the_model_unchanged(tmp_path: Path) -> None:
    cfg = _config()
    _, recipe, state = start_state(cfg, tmp_path, ARM)
    uplink = recipe.recipe_at(1).uplink
    population = build_population(cfg)
    summed = secure_sum(lambda reqs: ({}, 0.0, 0), uplink=uplink, params=state.params)
    new, rep = deployed_round(recipe, state, population.clients, summed, model_fn=cfg.model)
    assert rep.rejected and not rep.accepted
    assert tree.sha256(new.params) == tree.sha256(state.params)
