"""The commit a benchmark records: dirty for changed sources, not for its own results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedtransfer.experiment import machine


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_git_commit_ignores_the_benchmarks_own_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "a.md").write_text("old\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(machine, "REPO", tmp_path)
    clean = machine.git_commit()
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "a.md").write_text("new figures\n")
    assert machine.git_commit() == clean
    (tmp_path / "src.py").write_text("x = 2\n")
    assert machine.git_commit() == f"{clean}-dirty"
