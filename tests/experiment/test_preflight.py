"""Bad configurations end as an ``error:`` line and exit status 2, before pre-training, and
leave at most a run directory marked ``failed`` — never a traceback, never ``"running"``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtransfer import cli

BAD_SETTINGS = {
    # more clients than examples (1,797 digits), then clients of one example
    "iid-5000-clients": (
        ["data.num_clients=5000", "data.partition={kind: iid}"],
        "data.num_clients",
    ),
    "iid-1797-clients": (
        ["data.num_clients=1797", "data.partition={kind: iid}"],
        "data.num_clients",
    ),
    "infeasible-dirichlet": (
        ["data.partition={kind: dirichlet, alpha: 0.001, min_size: 40}", "data.num_clients=40"],
        "min_size",
    ),
    "negative-channels": (["model.channels=[-4, 8]"], "model:"),
    "krum-f-100": (["aggregator={kind: krum, f: 100}"], "arms.0 (scratch): Krum"),
    "cohort-of-50-of-20": (["sampler.clients_per_round=50"], "arms.0 (scratch)"),
}


def _run(tmp_path: Path, argv: list[str]) -> int:
    return cli.main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "bad", *argv])


def _no_live_run_left(tmp_path: Path) -> None:
    """No run directory, or one whose run.json says failed."""
    runs = tmp_path / "runs"
    for run in runs.iterdir() if runs.exists() else ():
        manifest = run / "run.json"
        if manifest.exists():
            status = json.loads(manifest.read_text())["status"]
            assert status == "failed", f"{run}: status {status}"
        assert not (run / "checkpoints").exists()
        assert not (run / "pretrained").exists()  # failed before pre-training


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_bad_setting_is_an_error_line_before_pre_training(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets, names = BAD_SETTINGS[case]
    argv = [arg for s in sets for arg in ("--set", s)]
    assert _run(tmp_path, argv) == 2
    out = capsys.readouterr().out
    assert "error:" in out and names in out and "Traceback" not in out
    _no_live_run_left(tmp_path)


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (bytes(range(256)) * 4, "not a text file"),
        (b"a: " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
    ids=["binary-file", "nested-5000-deep"],
)
def test_a_bad_config_file_is_an_error_line(
    content: bytes, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert _run(tmp_path, [str(path)]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and names in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (OSError(28, "No space left on device"), "disk-full"),
        (KeyboardInterrupt(), "interrupted"),
        (ValueError("boom"), "failed"),
    ],
)
def test_run_json_records_why_a_run_stopped(
    exc: BaseException, status: str, tmp_path: Path
) -> None:
    from fedtransfer.experiment.run import _mark_stopped

    _mark_stopped(tmp_path, {"status": "running", "name": "x"}, exc)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["status"] == status and manifest["name"] == "x"
    assert type(exc).__name__ in manifest["error"]


def test_an_os_error_is_an_error_line_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(args: object) -> int:
        raise OSError(28, "No space left on device", "runs/x/checkpoints/a/state.safetensors")

    monkeypatch.setitem(cli.COMMANDS, "run", full)
    assert cli.main(["run"]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and "state.safetensors" in out and "free some space" in out
    assert "fedtransfer resume" in out


def test_a_damaged_run_json_is_written_anew_and_the_run_goes_on(tmp_path: Path) -> None:
    from fedtransfer.experiment.run import _Run, load_config

    (tmp_path / "run.json").write_bytes(b"\xff{not json")
    run = _Run(load_config(None, []), tmp_path, lambda *a: None, None)  # type: ignore[arg-type]
    manifest = run._manifest()
    assert manifest["status"] == "running" and manifest["format"] == "fedtransfer-run/1"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"
