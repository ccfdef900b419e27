"""The default offline experiment (`make run`) shows what the project promises."""

from __future__ import annotations

import json

import pytest

from fedtransfer.experiment.run import load_config, run_experiment


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default")
    summary = run_experiment(load_config(None), run_dir)
    return run_dir, summary


def test_default_run_pretrained_full_needs_at_most_a_third_of_scratch_rounds(default_run):
    _, summary = default_run
    scratch = summary["arms"]["scratch"]["rounds_to_target"]
    full = summary["arms"]["pretrained-full"]["rounds_to_target"]
    assert full is not None
    assert scratch is None or full <= scratch / 3


def test_default_run_head_only_sends_10x_fewer_bytes_per_round(default_run):
    _, summary = default_run
    arms = summary["arms"]
    assert arms["pretrained-head"]["bytes_per_round"] * 10 <= arms["scratch"]["bytes_per_round"]
    assert arms["pretrained-head"]["vs_baseline"]["bytes_per_round_reduction"] >= 10


def test_default_run_writes_summary_report_and_plots(default_run):
    run_dir, _ = default_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for arm in ("scratch", "pretrained-full", "pretrained-head"):
        for key in ("final_accuracy", "rounds_to_target", "bytes_to_target", "total_bytes"):
            assert key in on_disk["arms"][arm]
        assert on_disk["arms"][arm]["setup_bytes"] > 0
    text = (run_dir / "report.md").read_text()
    for png in ("accuracy_vs_round", "accuracy_vs_mb", "client_accuracy", "partition"):
        assert f"plots/{png}.png" in text
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000
    assert (run_dir / "config.resolved.yaml").exists()
    assert (run_dir / "pretrain" / "model.safetensors").exists()


def test_default_run_metrics_have_every_round_and_arm(default_run):
    run_dir, _ = default_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 31
    first = lines[1]
    for key in (
        "accuracy",
        "loss",
        "client_accuracy_mean",
        "client_accuracy_p10",
        "bytes_up",
        "bytes_down",
        "seconds",
    ):
        assert key in first
    total = sum(r["round_bytes"] for r in lines if r["arm"] == "scratch")
    assert total == lines[30]["cum_bytes"]
