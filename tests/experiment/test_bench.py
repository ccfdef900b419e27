"""``fedtransfer bench transfer``: a config over seeds, mean ± sd per arm, pre-trained minus
scratch per algorithm, the named benchmark's checks; and the natural (by-writer) partition."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedtransfer.cli import main
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.bench import CHECKS
from fedtransfer.experiment.run import build_population, load_config

SHARED = Path(os.environ.get("FEDTRANSFER_DATA") or Path(__file__).parents[3] / "shared" / "data")

TINY = """# A tiny digits benchmark for the tests.
# Two lines of description.
name: tiny
rounds: 2
target_accuracy: 0.3
model: {kind: cnn, num_classes: 10, channels: [4, 8], hidden: 16}
data: {source: {kind: digits}, partition: {kind: dirichlet, alpha: 0.5}, num_clients: 6}
pretrain:
  source: {kind: mnist5k}
  training: {optimizer: adam, lr: 0.001, epochs: 1, batch_size: 64}
  augment: null
training: {lr: 0.05, momentum: 0.9, epochs: 1, batch_size: 32}
sampler: {kind: uniform, clients_per_round: 3}
personalization: null
arms:
- {name: scratch-fedavg, init: scratch}
- {name: pretrained-fedavg, init: pretrained}
- {name: pretrained-head, init: pretrained, policy: {kind: head_only}}
"""


def test_bench_transfer_runs_seeds_and_writes_the_report(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(TINY)
    out = tmp_path / "results"
    args = ["bench", "transfer", "tiny", "--seeds", "3", "4", "--configs", str(configs)]
    args += ["--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--threads", "1"]
    assert main(args) == 0
    figures = json.loads((out / "tiny.json").read_text())
    assert figures["seeds"] == [3, 4] and figures["rounds"] == 2
    arms = figures["arms"]
    assert list(arms) == ["scratch-fedavg", "pretrained-fedavg", "pretrained-head"]
    for seed in ("3", "4"):  # the per-seed figures are each run's own summary
        summary = json.loads((tmp_path / "runs" / f"tiny-seed{seed}" / "summary.json").read_text())
        i = figures["seeds"].index(int(seed))
        for arm, a in arms.items():
            assert a["final_accuracy"]["values"][i] == summary["arms"][arm]["final_accuracy"]
    gain = figures["pairs"]["fedavg"]["gain"]["values"]
    expected = [
        p - q
        for p, q in zip(
            arms["pretrained-fedavg"]["final_accuracy"]["values"],
            arms["scratch-fedavg"]["final_accuracy"]["values"],
            strict=True,
        )
    ]
    assert gain == pytest.approx(expected) and "head" not in figures["pairs"]
    assert len(figures["curves"]["pretrained-head"]["4"]) == 3  # rounds 0, 1, 2
    md = (out / "tiny.md").read_text()
    assert "A tiny digits benchmark for the tests. Two lines of description." in md
    assert "| pretrained-fedavg |" in md and "## Pre-trained minus scratch" in md
    assert (out / "tiny.png").stat().st_size > 0
    assert figures["checks"] == []  # no claims registered for this name
    # --report measures the claims again from the seeds' run directories
    from fedtransfer.experiment import bench

    monkeypatch.setitem(bench.CHECKS, "tiny", (bench._near_oracle("pretrained-head", 100),))
    bench.rewrite_report("tiny", configs=configs, out=out, runs_dir=tmp_path / "runs")
    (check,) = json.loads((out / "tiny.json").read_text())["checks"]
    assert check["met"] is True and "`pretrained-head`" in check["measured"]
    assert check["measured"] in (out / "tiny.md").read_text()


def test_bench_of_an_unknown_config_names_the_known_ones(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.yaml").write_text("name: a\n")
    code = main(["bench", "transfer", "nope", "--configs", str(tmp_path)])
    assert code == 2
    assert "known benchmarks: ['a']" in capsys.readouterr().out


def _summaries(finals: dict[str, list[float]]) -> dict[int, dict]:
    seeds = len(next(iter(finals.values())))
    return {
        s: {"arms": {arm: {"final_accuracy": v[s]} for arm, v in finals.items()}}
        for s in range(seeds)
    }


def test_femnist_checks_measure_the_claims() -> None:
    gain, over_best = CHECKS["femnist"]
    s = _summaries(
        {
            "scratch-fedavg-full": [0.20, 0.22, 0.18],
            "scratch-fedadam-full": [0.35, 0.33, 0.31],
            "pretrained-fedavg-full": [0.64, 0.66, 0.62],
        }
    )
    text, ok = gain.measure(s)
    assert ok and text.startswith("+44.0 points")
    text, ok = over_best.measure(s)
    assert ok and "+31.0 points over `scratch-fedadam-full`" in text
    worse = _summaries(
        {
            "scratch-fedavg-full": [0.30, 0.30, 0.30],
            "scratch-fedadam-full": [0.40, 0.40, 0.40],
            "pretrained-fedavg-full": [0.65, 0.65, 0.65],
        }
    )
    assert gain.measure(worse)[1] is False and over_best.measure(worse)[1] is False


def test_text_check_compares_the_best_federated_arm_with_the_oracle() -> None:
    (near,) = CHECKS["text-agnews"]
    s = _summaries(
        {
            "pretrained-head": [0.870, 0.874],
            "lp-ft": [0.880, 0.886],
            "centralised-head": [0.89, 0.89],
        }
    )
    text, ok = near.measure(s)
    assert ok and text == "`lp-ft` 0.7 points below `centralised-head`"
    s = _summaries({"pretrained-head": [0.86, 0.86], "centralised-head": [0.89, 0.89]})
    assert near.measure(s)[1] is False
    s = _summaries({"lp-ft": [0.90, 0.90], "centralised-head": [0.88, 0.88]})
    assert near.measure(s) == ("`lp-ft` 2.0 points above `centralised-head`", True)


def test_natural_partition_takes_the_writers_of_the_source() -> None:
    cfg = load_config(
        None,
        [
            f"data.source={{kind: femnist, root: {SHARED}}}",
            "data.partition={kind: natural}",
            "data.num_clients=4",
            "model.num_classes=62",
        ],
    )
    population = build_population(cfg)
    assert len(population.clients) == 4 and population.num_classes == 62
    assert all(c.startswith("f") for c in population.clients)  # LEAF writer ids
    too_many = load_config(
        None,
        [
            f"data.source={{kind: femnist, root: {SHARED}, writers: 3}}",
            "data.partition={kind: natural}",
            "data.num_clients=4",
        ],
    )
    with pytest.raises(ConfigError, match="the source has 3 clients"):
        build_population(too_many)
    digits = load_config(None, ["data.partition={kind: natural}"])
    with pytest.raises(ConfigError, match="natural needs a source with its own clients"):
        build_population(digits)


def test_negative_transfer_flags_clients_the_pretrained_start_hurts() -> None:
    from fedtransfer.experiment.report import NEGATIVE_MARGIN, negative_transfer

    pre = {"client_accuracy": {"a": 0.90, "b": 0.50, "c": 0.70, "d": 0.61}}
    scratch = {"client_accuracy": {"a": 0.80, "b": 0.70, "c": 0.70 + NEGATIVE_MARGIN, "d": 0.65}}
    out = negative_transfer(pre, scratch, against="scratch-x")
    assert out["count"] == 2 and list(out["flagged"]) == ["b", "c"]  # worst first; d within margin
    assert out["flagged"]["b"] == {"pretrained": 0.50, "scratch": 0.70}
    assert out["clients"] == 4 and out["against"] == "scratch-x"
    assert out["mean_gap"] == pytest.approx((0.10 - 0.20 - NEGATIVE_MARGIN - 0.04) / 4)


def test_bench_and_run_reports_show_the_guardrail(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(TINY)
    out = tmp_path / "results"
    args = ["bench", "transfer", "tiny", "--seeds", "1", "--configs", str(configs)]
    args += ["--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "runs" / "tiny-seed1" / "summary.json").read_text())
    arms = summary["arms"]
    assert "negative_transfer" not in arms["scratch-fedavg"]
    assert arms["pretrained-fedavg"]["negative_transfer"]["against"] == "scratch-fedavg"
    assert arms["pretrained-head"]["negative_transfer"]["against"] == "scratch-fedavg"  # baseline
    assert arms["pretrained-head"]["negative_transfer"]["clients"] == 6
    report = (tmp_path / "runs" / "tiny-seed1" / "report.md").read_text()
    assert "## Negative transfer" in report and "| pretrained-head | `scratch-fedavg` |" in report
    figures = json.loads((out / "tiny.json").read_text())
    nt = figures["negative_transfer"]["pretrained-fedavg"]
    assert nt["count"] == [arms["pretrained-fedavg"]["negative_transfer"]["count"]]
    assert "## Negative transfer" in (out / "tiny.md").read_text()


SWEEP = """# A tiny sweep.
sweep:
  groups:
    tiny-digits: {config: tiny.yaml, set: ["arms=[{name: scratch, init: scratch}, {name: pretrained-full, init: pretrained}]"]}
  values:
    skewed: ["data.partition={kind: dirichlet, alpha: 0.1, min_size: 5}"]
    iid: ["data.partition={kind: iid}"]
  penalty: {reference: iid, stressed: skewed}
  max_ratio: 0.5
"""


def test_sweep_bench_reports_the_penalty_of_each_start(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(TINY)
    (configs / "sweep.yaml").write_text(SWEEP)
    out = tmp_path / "results"
    args = ["bench", "transfer", "sweep", "--seeds", "0", "1", "--configs", str(configs)]
    args += ["--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--threads", "1"]
    assert main(args) == 0
    f = json.loads((out / "sweep.json").read_text())
    acc = f["final_accuracy"]["tiny-digits"]
    for seed in (0, 1):  # the cells are the runs' own summaries
        run = tmp_path / "runs" / f"sweep-tiny-digits-skewed-seed{seed}" / "summary.json"
        summary = json.loads(run.read_text())
        assert (
            acc["skewed"]["scratch"]["values"][seed] == summary["arms"]["scratch"]["final_accuracy"]
        )
    for arm in ("scratch", "pretrained-full"):
        expected = [
            i - s
            for i, s in zip(acc["iid"][arm]["values"], acc["skewed"][arm]["values"], strict=True)
        ]
        assert f["penalty"]["tiny-digits"][arm]["values"] == pytest.approx(expected)
    (check,) = f["checks"]
    p = f["penalty"]["tiny-digits"]["pretrained-full"]["mean"]
    q = f["penalty"]["tiny-digits"]["scratch"]["mean"]
    assert check["met"] == (q > 0 and p <= 0.5 * q)
    md = (out / "sweep.md").read_text()
    assert "| tiny-digits | pretrained-full |" in md and "penalty, points" in md
    (out / "sweep.md").unlink()  # --report writes it again from the recorded figures
    assert (
        main(
            ["bench", "transfer", "sweep", "--report", "--configs", str(configs), "--out", str(out)]
        )
        == 0
    )
    assert (out / "sweep.md").read_text() == md


def test_runner_evaluates_a_frozen_trunk_through_the_feature_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head-only arms evaluate every client from the cached trunk features (the whole model
    is never run at evaluation); full fine-tuning evaluates the whole model; same accuracies
    as evaluating the whole model."""
    from fedtransfer.client.fast import features
    from fedtransfer.experiment import baselines
    from fedtransfer.experiment import evaluation as run_module

    whole: list[str] = []
    trained: list[str] = []
    original, original_train = run_module.evaluate, baselines.local_train

    def counting(model, data, **kw):  # type: ignore[no-untyped-def]
        whole.append("x")
        return original(model, data, **kw)

    def counting_train(*args, **kw):  # type: ignore[no-untyped-def]
        trained.append("x")
        return original_train(*args, **kw)

    monkeypatch.setattr(run_module, "evaluate", counting)
    monkeypatch.setattr(baselines, "local_train", counting_train)
    cfg = load_config(
        None,
        [
            "rounds=2",
            "model.channels=[4, 8]",
            "model.hidden=16",
            "data.num_clients=6",
            "sampler.clients_per_round=3",
            "pretrain.training.epochs=1",
            "personalization=null",
            "arms=[{name: pretrained-head, init: pretrained, policy: {kind: head_only}},"
            " {name: central-head, mode: centralised, policy: {kind: head_only}},"
            " {name: local-head, mode: local-only, policy: {kind: head_only}}]",
        ],
    )
    from fedtransfer.experiment.run import run_experiment

    cached = run_experiment(cfg, tmp_path / "cached")
    assert whole == []  # 3 arms x 3 evaluations x 6 clients, all from the cache
    assert trained == []  # centralised and local-only heads train on cached features too
    with features.no_feature_cache():
        uncached = run_experiment(cfg, tmp_path / "uncached")
    assert len(whole) == 3 * 3 * 6
    assert len(trained) == 2 * (1 + 6)  # 2 rounds: the pooled model, then each client
    for arm in ("pretrained-head", "central-head", "local-head"):
        a, b = cached["arms"][arm], uncached["arms"][arm]
        assert a["final_accuracy"] == b["final_accuracy"], arm
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-6), arm
