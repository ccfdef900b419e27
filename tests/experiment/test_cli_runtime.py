"""``--runtime`` picks where client updates run; every choice reproduces the serial run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedtransfer.cli import _parser, _runtime, main
from fedtransfer.client.fast import vectorized
from fedtransfer.errors import ConfigError
from fedtransfer.runtime import AutoRuntime, SerialRuntime, VectorizedRuntime


@pytest.mark.parametrize(
    "choice,kind",
    [("serial", SerialRuntime), ("vectorized", VectorizedRuntime), ("auto", AutoRuntime)],
)
def test_runtime_option_builds_that_runtime(choice: str, kind: type) -> None:
    args = _parser().parse_args(["run", "--runtime", choice])
    with _runtime(args) as runtime:
        assert isinstance(runtime, kind)


def test_workers_need_a_pool() -> None:
    args = _parser().parse_args(["run", "--runtime", "vectorized", "--workers", "2"])
    with pytest.raises(ConfigError, match="--workers"), _runtime(args):
        pass


def test_threads_hold_for_the_command_only() -> None:
    before = torch.get_num_threads()
    args = _parser().parse_args(["run", "--threads", str(before + 1)])
    with _runtime(args):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def _final(run: Path) -> dict[str, torch.Tensor]:
    files = sorted(run.glob("checkpoints/scratch/round-*/state.safetensors"))
    assert files, f"no checkpoint under {run}"
    flat = load_file(str(files[-1]))
    return {k: v for k, v in flat.items() if k.startswith("params/")}


def test_vectorized_cli_run_matches_the_serial_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched: list[int] = []
    real = vectorized.vectorized_update

    def spy(tasks: Any, **kwargs: Any) -> Any:
        out = real(tasks, **kwargs)
        batched.append(0 if out is None else len(out))
        return out

    monkeypatch.setattr(vectorized, "vectorized_update", spy)
    small = [
        "rounds=2",
        "data.num_clients=6",
        "sampler.clients_per_round=3",
        "personalization=null",
        # the last two layers train: the frozen BatchNorm runs in eval mode, so the cohort
        # can train at once (a BatchNorm in train mode would fall back to one by one)
        "arms=[{name: scratch, init: scratch, policy: {kind: last_k, k: 2}}]",
    ]
    sets = [x for item in small for x in ("--set", item)]
    common = ["run", *sets, "--runs-dir", str(tmp_path), "--threads", "1"]
    assert main([*common, "--name", "serial"]) == 0
    assert batched == []
    assert main([*common, "--name", "vect", "--runtime", "vectorized"]) == 0
    assert batched == [3, 3]  # both rounds' cohorts trained at once
    serial, vect = _final(tmp_path / "serial"), _final(tmp_path / "vect")
    assert serial.keys() == vect.keys() and serial
    for k, v in serial.items():
        assert torch.allclose(vect[k], v, rtol=0, atol=1e-5), k
