"""Run directories (``fedtransfer.experiment.run.new_run_dir``): safe names, no clobbering."""

from __future__ import annotations

import pytest

from fedtransfer.errors import ConfigError
from fedtransfer.experiment.run import new_run_dir


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
