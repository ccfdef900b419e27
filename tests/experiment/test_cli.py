"""The command line: partition, config and clear errors."""

from __future__ import annotations

import json

from fedtransfer.cli import main


def test_cli_partition_writes_report(tmp_path, capsys):
    code = main(["partition", "--set", "data.num_clients=5", "--out", str(tmp_path)])
    assert code == 0
    stats = json.loads((tmp_path / "partition.json").read_text())
    assert len(stats["clients"]) == 5
    assert sum(stats["train_sizes"]) + sum(stats["test_sizes"]) == 1797
    assert (tmp_path / "partition.png").stat().st_size > 0
    assert "label histogram" in (tmp_path / "partition.md").read_text()


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "rounds=3"]) == 0
    assert "rounds: 3" in capsys.readouterr().out


def test_cli_bad_config_exits_2_with_dotted_path(capsys):
    assert main(["config", "--set", "training.lr=fast"]) == 2
    out = capsys.readouterr().out
    assert "training.lr" in out and "expected a number" in out


def test_cli_resume_of_non_run_dir_is_an_error(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "config.resolved.yaml" in capsys.readouterr().out
