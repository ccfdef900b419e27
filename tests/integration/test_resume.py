"""A run SIGKILLed mid-way resumes to final weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtransfer import tree
from fedtransfer.experiment.run import final_weights, load_config, run_experiment

SMALL = [
    "rounds=6",
    "data.num_clients=8",
    "sampler.clients_per_round=4",
    "pretrain.training.steps=25",
    "arms=[{name: scratch, init: scratch}, {name: head, policy: {kind: head_only}}]",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtransfer.cli", *args]


def _latest_round(run_dir: Path, arm: str) -> int:
    pointer = run_dir / "checkpoints" / arm / "latest.json"
    try:
        return int(json.loads(pointer.read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _kill_after(run_dir: Path, arm: str, round_: int) -> None:
    sets = [x for item in SMALL for x in ("--set", item)]
    proc = subprocess.Popen(
        _cli("run", *sets, "--runs-dir", str(run_dir.parent), "--name", run_dir.name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while _latest_round(run_dir, arm) < round_:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "run did not reach the kill point in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    killed = tmp_path / "killed"
    _kill_after(killed, "scratch", 2)
    manifest = json.loads((killed / "run.json").read_text())
    assert manifest["status"] == "running", "the kill must land before the run finishes"
    assert _latest_round(killed, "scratch") < 6

    done = subprocess.run(_cli("resume", str(killed)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    # the reference runs in a subprocess too: same environment, same torch thread count
    reference = tmp_path / "reference"
    sets = [x for item in SMALL for x in ("--set", item)]
    straight = subprocess.run(
        _cli("run", *sets, "--runs-dir", str(tmp_path), "--name", "reference"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    for arm in ("scratch", "head"):
        assert tree.equal(final_weights(killed, arm), final_weights(reference, arm)), arm

    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["arm"], r["round"]) for r in lines]
    assert keys == [(a, r) for a in ("scratch", "head") for r in range(7)]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in lines] == [r["accuracy"] for r in ref]


def test_run_refuses_a_different_config_in_the_same_directory(tmp_path):
    import pytest

    from fedtransfer.errors import ConfigError

    (tmp_path / "config.resolved.yaml").write_text("name: other\n")
    with pytest.raises(ConfigError, match="different configuration"):
        run_experiment(load_config(None, SMALL), tmp_path)
