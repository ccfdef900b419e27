"""`fedtransfer pretrain` writes a verified checkpoint that a run can start from, by hash."""

from __future__ import annotations

import json

import pytest

from fedtransfer.cli import main
from fedtransfer.errors import CompatibilityError
from fedtransfer.experiment.run import load_config, run_experiment
from fedtransfer.transfer import load_checkpoint

FAST = [
    "pretrain.training.steps=15",
    "rounds=2",
    "data.num_clients=6",
    "sampler.clients_per_round=3",
]
ARMS = "arms=[{name: head, policy: {kind: head_only}}]"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    sets = [x for item in FAST for x in ("--set", item)]
    assert main(["pretrain", *sets, "--set", "seed=1", "--out", str(out)]) == 0
    return out


def test_pretrain_cli_writes_weights_and_provenance(checkpoint):
    meta = json.loads((checkpoint / "model.json").read_text())
    for key in ("sha256", "file_sha256", "source", "source_sha256", "spec", "seed", "metrics"):
        assert key in meta
    assert meta["source"] == {"kind": "mnist5k"}
    assert load_checkpoint(checkpoint).sha256 == meta["sha256"]


def test_run_from_checkpoint_records_its_hash(checkpoint, tmp_path):
    sha = load_checkpoint(checkpoint).sha256
    cfg = load_config(
        None, [*FAST, ARMS, f"pretrain.checkpoint={checkpoint}", f"pretrain.sha256={sha}"]
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["pretrained"]["sha256"] == sha
    assert not (tmp_path / "pretrain").exists()


def test_run_refuses_checkpoint_with_other_hash(checkpoint, tmp_path):
    cfg = load_config(
        None, [*FAST, ARMS, f"pretrain.checkpoint={checkpoint}", "pretrain.sha256=" + "f" * 64]
    )
    with pytest.raises(CompatibilityError, match="is not the expected"):
        run_experiment(cfg, tmp_path)


def test_resume_refuses_a_replaced_checkpoint(checkpoint, tmp_path):
    cfg = load_config(None, [*FAST, ARMS])
    run_experiment(cfg, tmp_path)
    # replace the run's own pre-trained weights by another valid checkpoint: the recorded hash differs
    for name in ("model.safetensors", "model.json"):
        (tmp_path / "pretrain" / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(CompatibilityError, match="is not the expected"):
        run_experiment(cfg, tmp_path)
