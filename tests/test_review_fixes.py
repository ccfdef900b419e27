"""Regressions found in review: each test pins one defect that once slipped through."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from fedtransfer import (
    CompatibilityError,
    ConfigError,
    LocalTraining,
    Recipe,
    Reply,
    ServerState,
    run_round,
)
from fedtransfer.codecs import Payload
from fedtransfer.errors import PayloadError
from fedtransfer.experiment.report import write_report
from fedtransfer.experiment.run import load_config, new_run_dir
from fedtransfer.server import AllClients, ServerPipeline
from fedtransfer.transfer import LocalBatchNorm

from .conftest import make_tiny_data, make_tiny_model


def _header_payload(tensors: list[dict[str, Any]], data: bytes = b"") -> bytes:
    head = json.dumps({"codec": "float32", "meta": {}, "tensors": tensors}).encode()
    return struct.pack("<4sBI", b"FTPL", 1, len(head)) + head + data


@pytest.mark.parametrize("shape", [[0, 2**63], [2**40, 2**40, 0], [2**41], [1] * 17])
def test_payload_huge_or_deep_shapes_are_payload_errors(shape):
    spec = {"key": "w", "dtype": "float32", "shape": shape, "meta": {}}
    with pytest.raises(PayloadError, match="exceeds the limits"):
        Payload.from_bytes(_header_payload([spec]))


def test_payload_bool_bytes_other_than_0_or_1_rejected():
    spec = {"key": "b", "dtype": "bool", "shape": [2], "meta": {}}
    with pytest.raises(PayloadError, match="bool bytes"):
        Payload.from_bytes(_header_payload([spec], b"\x01\x02"))


def test_payload_non_finite_header_number_rejected():
    head = b'{"codec": "float32", "meta": {"x": NaN}, "tensors": []}'
    with pytest.raises(PayloadError, match="non-finite"):
        Payload.from_bytes(struct.pack("<4sBI", b"FTPL", 1, len(head)) + head)


class _RejectFirst:
    """Runtime that garbles one client's uplink in round 1 only."""

    def __init__(self, victim: str) -> None:
        self.victim, self.calls = victim, 0

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        self.calls += 1
        out = [fn(t) for t in tasks]
        self.trained = out
        if self.calls == 1:
            out = [
                dataclasses.replace(r, uplink=b"garbage") if r.client == self.victim else r
                for r in out
            ]
        return out


def test_round_client_rejected_in_round_one_with_local_keys_trains_in_round_two():
    data = make_tiny_data()
    recipe = Recipe(
        policy=LocalBatchNorm(),
        local=LocalTraining(steps=2, batch_size=4),
        pipeline=ServerPipeline(),
        sampler=AllClients(),
    )
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    runtime = _RejectFirst("c0")
    state, first = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert [c for c, _ in first.rejected] == ["c0"] and "c0" not in state.holdings.local
    state, second = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert "c0" in second.accepted and not second.rejected


def test_round_train_loss_counts_accepted_clients_only():
    data = make_tiny_data()
    recipe = Recipe(local=LocalTraining(steps=2, batch_size=4), sampler=AllClients())
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    runtime = _RejectFirst("c0")
    _, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    kept = [r.metrics["loss"] for r in runtime.trained if r.client != "c0"]
    assert report.rejected
    assert report.metrics["client/train_loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-12)


def test_recipe_validate_rejects_codec_that_changes_model_dtype():
    with pytest.raises(CompatibilityError, match=r"dtype torch\.float64"):
        Recipe().validate(nn.Linear(2, 2).double())


def test_config_arm_partial_local_keeps_experiment_settings():
    cfg = load_config(None, ["arms.scratch.local.lr=0.05"])
    local = cfg.recipe(cfg.arms[0]).local
    assert local.lr == 0.05 and local.momentum == cfg.local.momentum == 0.9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("local=null", r"^local: expected a mapping for LocalTraining"),
        ("name=..", r"^name: '\.\.' is not a valid run name"),
        ("pretrain.sha256=abc", r"^pretrain: sha256: only checks a given checkpoint"),
        ("pretrain.holdout_fraction=1.0", r"^pretrain: holdout_fraction: must be in \[0, 1\)"),
        ("data.num_clients=0", r"^data: num_clients: must be >= 1"),
        ("data.partition.alpha=-1", r"^data\.partition: Dirichlet: alpha must be > 0"),
        ("local.lr=.inf", r"^local: LocalTraining: lr must be finite"),
        ("server_optimizer.lr=.inf", r"^server_optimizer: ServerSGD: lr must be finite"),
        ("name=[oops", r"^--set name: value '\[oops' is not valid YAML"),
    ],
)
def test_config_rejects_bad_values_with_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_new_run_dir_refuses_to_overwrite_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a fedtransfer run directory"):
        new_run_dir(tmp_path, "default", overwrite=True)
    assert (tmp_path / "default" / "precious.txt").exists()


def test_new_run_dir_rejects_names_that_escape_the_runs_dir(tmp_path):
    for name in ("", ".", "..", "a/b", "/abs"):
        with pytest.raises(ConfigError, match="not a valid run name"):
            new_run_dir(tmp_path, name, overwrite=True)


def test_report_of_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"summary\.json, metrics\.jsonl, partition\.json missing"
    ):
        write_report(tmp_path)


def test_set_up_is_exact_for_float64_models():
    from fedtransfer.client.update import SETUP_CODEC, verify_start
    from fedtransfer.tree import sha256

    weights = {"w": torch.randn(3, dtype=torch.float64)}
    back = verify_start(SETUP_CODEC.encode(weights).to_bytes(), sha256(weights), client="c")
    assert back["w"].dtype == torch.float64 and torch.equal(back["w"], weights["w"])
