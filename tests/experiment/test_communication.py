"""Communication arms end to end: ready configs validate, codecs and stages reach the ledger and
the report's communication table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtransfer.experiment.run import build_population, load_config, run_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SMALL = [
    "rounds=3",
    "data.num_clients=4",
    "sampler={kind: all}",
    "model.channels=[4, 8]",
    "model.hidden=16",
    "training.steps=2",
    "training.batch_size=16",
    "pretrain.training.epochs=1",
    "personalization=null",
]
ARMS = (
    "arms=[{name: scratch, init: scratch}, "
    "{name: int8, downlink: {kind: int8}, uplink: {kind: int8}}, "
    "{name: lpft, schedule: {kind: lp_ft, head_rounds: 1}}, "
    "{name: topk, uplink: {kind: topk, ratio: 0.01}, client_transforms: [{kind: error_feedback}]}]"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread_module: None) -> None:
    """Tiny models: intra-op threads only slow them down (see ``single_thread``)."""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_every_arm_recipe_validates(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())
    if "sweep" in spec:  # a grid: every group under every value is an experiment
        sweep = spec["sweep"]
        configs = [
            load_config(path.parent / g["config"], [*g.get("set", []), *sets])
            for g in sweep["groups"].values()
            for sets in sweep["values"].values()
        ]
    else:
        configs = [load_config(path)]
    for cfg in configs:
        population = build_population(cfg)
        for arm in cfg.arms:
            plan = cfg.schedule_of(arm).validate(cfg.model(), population=population.clients)
            assert plan.shared, arm.name


def test_configs_include_the_communication_experiment() -> None:
    assert "communication.yaml" in {p.name for p in CONFIGS}


@pytest.fixture(scope="module")
def comm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("comm")
    summary = run_experiment(load_config(None, [*SMALL, ARMS]), run_dir)
    return run_dir, summary


def _records(run_dir: Path, arm: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["arm"] == arm and r["round"] > 0]


def test_communication_int8_rounds_cost_a_fraction_of_float32(
    comm_run: tuple[Path, dict[str, Any]],
) -> None:
    arms = comm_run[1]["arms"]
    ratio = arms["int8"]["bytes_per_round"] / arms["scratch"]["bytes_per_round"]
    # uint8 codes (1/4) plus, on this tiny model, per-tensor headers and (min, scale) pairs
    assert 0.25 < ratio < 0.4


def test_communication_topk_uplink_is_sparse_downlink_is_not(
    comm_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, _ = comm_run
    topk, full = _records(run_dir, "topk"), _records(run_dir, "scratch")
    assert all(t["bytes_down"] == f["bytes_down"] for t, f in zip(topk, full, strict=True))
    # 1 % of the values + int32 indices; on this tiny model the headers dominate what is left
    assert all(t["bytes_up"] < 0.3 * f["bytes_up"] for t, f in zip(topk, full, strict=True))


def test_communication_error_feedback_residual_is_kept_by_clients(
    comm_run: tuple[Path, dict[str, Any]],
) -> None:
    from fedtransfer.state import load_state

    state = load_state(comm_run[0] / "checkpoints" / "topk")
    assert state.holdings.memory and all(
        any(k.startswith("transform/0/") for k in mem) for mem in state.holdings.memory.values()
    )


def test_communication_stages_split_the_ledger(comm_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, summary = comm_run
    records = _records(run_dir, "lpft")
    assert [r["round_metrics"]["schedule/stage"] for r in records] == [0.0, 1.0, 1.0]
    by_stage = summary["arms"]["lpft"]["bytes_by_stage"]
    assert by_stage == {
        "0": records[0]["round_bytes"],
        "1": records[1]["round_bytes"] + records[2]["round_bytes"],
    }
    # the head stage sends only the head; the full stage as much as a full arm
    assert records[0]["round_bytes"] < 0.05 * records[1]["round_bytes"]
    assert records[1]["round_bytes"] == _records(run_dir, "scratch")[0]["round_bytes"]


def test_communication_report_has_the_compression_table(
    comm_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, summary = comm_run
    text = (run_dir / "report.md").read_text()
    assert "## Communication" in text and "baseline `scratch`" in text
    table = text.split("## Communication")[1]
    row = next(line for line in table.splitlines() if line.startswith("| int8 |"))
    expected = summary["arms"]["int8"]["vs_baseline"]["bytes_per_round_reduction"]
    assert f"{expected:,.1f}×" in row
